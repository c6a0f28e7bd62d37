"""Settings of the ``tvm`` target: the ``[tvm]`` table of the config file and the "tvm target" flags."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TvmOptions:
    """Settings of the ``tvm`` target (Apache TVM), checked by that target."""

    tvm_target: str = field(default="host", metadata={
        "help": "device to compile for: host, aarch64-linux, aarch64-android, x86_64-linux, or TVM's JSON form "
                "('{\"kind\": \"llvm\", \"mtriple\": \"aarch64-linux-gnu\"}') (default: host)"})
    tvm_database: str = field(default="", metadata={
        "help": "a meta-schedule database folder of tuned schedules to apply before the default ones"})
