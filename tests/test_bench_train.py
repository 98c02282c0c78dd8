"""scripts/bench_train.py: the model-FLOPs arithmetic of the MFU figure."""

from __future__ import annotations

from script_loader import load_script


def test_bench_model_flops_by_hand() -> None:
    bench = load_script("bench_train")
    counts = {"encoder": 10, "decoder_ner": 20, "decoder_fwd": 20, "decoder_rev": 20}
    # Encoder 2*10*3 + 4*1*3*3*4 = 204; decoders 3 * (2*20*2 + 4*1*2*2*4 + 4*1*2*3*4) = 720; x3.
    assert bench.model_flops_per_sample(counts, d_model=4, layers=1, src=3, tgt=2) == 3 * (204 + 720)
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_tflops("Some GPU") is None
