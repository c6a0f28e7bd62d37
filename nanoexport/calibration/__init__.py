"""Calibration data, observers and block-wise weight quantizers (the quantization issue builds this stage)."""
