"""onnxruntime-genai loads onnx-target artifacts and generates PyTorch's greedy tokens."""

import numpy as np
import pytest
import torch

import nanoexport
from nanoexport.capture.checkpoint import SUPPORTED_FAMILIES, load_checkpoint
from nanoexport.validate.decoding import TorchReference, greedy

og = pytest.importorskip("onnxruntime_genai")
NEW_TOKENS = 32


def genai_greedy(folder, prompt):
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def test_genai_generates_the_demo_models_tokens_from_text(demo_artifact):
    model = og.Model(str(demo_artifact.path))
    prompt = og.Tokenizer(model).encode("Now is the winter of our discontent").tolist()
    reference = TorchReference(load_checkpoint(demo_artifact.manifest["source"]["source"]).model)
    assert genai_greedy(demo_artifact.path, prompt) == greedy(reference.next_token_stream(prompt), NEW_TOKENS)


@pytest.mark.parametrize("family", sorted(SUPPORTED_FAMILIES))
def test_genai_matches_pytorch_greedy(family, tiny_checkpoint, tmp_path):
    artifact = nanoexport.export(tiny_checkpoint(family), out=tmp_path / family, progress=False)
    prompt = np.random.default_rng(5).integers(3, 320, 12).tolist()
    reference = TorchReference(load_checkpoint(tiny_checkpoint(family)).model)
    with torch.no_grad():
        expected = greedy(reference.next_token_stream(prompt), NEW_TOKENS)
    assert genai_greedy(artifact.path, prompt) == expected
