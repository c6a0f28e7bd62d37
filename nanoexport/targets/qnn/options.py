"""Settings of the ``qnn`` target: the ``[qnn]`` table of the config file and the "qnn target" flags."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QnnOptions:
    """Settings of the ``qnn`` target (Qualcomm HTP), checked by that target."""

    soc_model: str = field(default="60", metadata={
        "help": "QNN SoC id to compile and emulate the HTP graphs for (default: 60)"})
    htp_arch: str = field(default="75", metadata={
        "help": "HTP architecture version: 68, 69, 73, 75, 79 or 81 (default: 75)"})
    max_part_bytes: str = field(default="1GB", metadata={
        "help": "weights per graph (e.g. 300MB); more layers are split into consecutive parts (default: 1GB)"})
    # Prefill and decode of a part in one context binary holding their weights once. The x86 HTP emulator
    # cannot load such a binary, so validation compiles the QDQ graphs again instead.
    share_weights: bool = field(default=False, metadata={
        "help": "one context binary per part, prefill and decode sharing its weights (validated from the QDQ "
                "graphs: the x86 emulator cannot load it)"})
