"""The ``coreml`` target: ``model.mlpackage`` with a stateful KV cache, for iOS 18 / macOS 15.

The package holds two functions over the same weights (stored once): ``prefill`` takes a fixed chunk of
``prefill_chunk`` tokens and ``decode`` one token. Both read and write the KV cache as Core ML states
``key_cache_{i}`` / ``value_cache_{i}`` of ``max_context`` slots, and return ``logits`` in fp16. Their
other inputs are the static cache's: ``input_ids``, ``position_ids``, ``attention_mask``,
``cache_position`` (int32).

Lowering starts from the static-cache canonical graph, specialized once per function (see ``lowering``).
Beside the package, ``neural_engine.json`` lists what may keep work off the Neural Engine. Validation runs
the saved package (coremltools prediction on macOS, our MIL interpreter elsewhere) against fp16 thresholds.
"""

from __future__ import annotations

from nanoexport.targets import Target

# Core ML computes in fp16, so the fp32 defaults (logits within 1e-4) cannot hold. Measured on the demo model
# and the tiny test families: logits max-abs <= 0.013, cosine >= 0.99999, KV consistency <= 0.008, top-1
# >= 0.979. Greedy agreement counts tokens until the first difference, so one fp16 near-tie flipped early
# costs most of a prompt: it is gated loosely and reported.
FP16_THRESHOLDS = {
    "logits_max_abs": 0.25, "logits_min_cosine": 0.999, "top1_agreement": 0.95, "kv_max_abs": 0.1,
    "greedy_agreement": 0.5, "perplexity_increase": 0.01,
}


def _package():
    # Imported when used, so that listing targets and building the command line import no coremltools.
    from nanoexport.targets.coreml import package

    return package


def _stored():
    # Imported when used: the manifest's digests read the weights back with the runtime's own reader.
    from nanoexport.targets.coreml import stored

    return stored


TARGET = Target(
    name="coreml",
    runtime="coremltools",
    install="pip install 'nanoexport[coreml]'",
    kv_cache_forms=("static",),  # Core ML states have a fixed shape
    split_prefill_decode=True,  # the package always holds the prefill and decode functions
    lower=lambda model, build: _package().lower(model, build),
    runner=lambda artifact: _package().Runner(artifact),
    validation_defaults=lambda config: dict(FP16_THRESHOLDS),
    notes=lambda artifact: _package().validation_notes(artifact),
    stored_weights=lambda folder: _stored().stored_weights(folder),
)
