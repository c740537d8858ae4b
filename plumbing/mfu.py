"""
MFU, model FLOPs utilization (PaLM paper, appendix B): the FLOPs a training step needs per token,
and the device's peak: NVIDIA's data sheets for GPUs, a measurement for CPUs."""

import time

import torch


def flops_per_token(config, T):
    """Training FLOPs per token: 6 per parameter in matmuls (forward 2, backward 4) plus attention's
    12 * L * E * T (PaLM paper, appendix B)."""
    L, E, V = config.n_layer, config.n_embd, config.padded_vocab_size
    return 6 * (12 * L * E * E + V * E) + 12 * L * E * T


# Dense peak TFLOP/s per card from NVIDIA's data sheets (with-sparsity figures halved): (16-bit
# tensor cores, fp32 runs), where fp32 runs use TF32 tensor cores from Ampere on
# (runtime.configure_process) and plain fp32 before. Keys are whole device names, as
# torch.cuda.get_device_name() reports them without the vendor words, so that "L4" is not "L40" and
# a MIG slice ("... MIG 1g.10gb"), which has a fraction of the card, has no entry.
GPU_PEAK_TFLOPS = {
    "H100 80GB HBM3": (989, 495), "H100 PCIe": (756, 378), "H100 NVL": (835, 418),  # SXM, PCIe, NVL
    "H200": (989, 495), "H200 NVL": (835, 418),
    "A100-SXM4-80GB": (312, 156), "A100-SXM4-40GB": (312, 156), "A100-PCIE-40GB": (312, 156),
    "A100 80GB PCIe": (312, 156), "A10": (125, 62.5),
    "L40S": (362, 183), "L40": (181, 90.5), "L4": (121, 60),
    "RTX 4090": (165, 82.6), "RTX 3090": (71, 35.6),
    "V100-SXM2-16GB": (125, 15.7), "V100-SXM2-32GB": (125, 15.7), "V100-PCIE-16GB": (112, 14),
    "V100-PCIE-32GB": (112, 14), "T4": (65, 8.1),  # Volta and Turing: fp16 tensor cores, no bf16
    "GTX 960": (2.4, 2.4),  # Maxwell: no tensor cores, fp16 at the fp32 rate
}


def peak_flops(rt):
    """The device's peak FLOP/s in the training dtype, for MFU: a table for GPUs (None for a card it
    does not know, or a MIG slice); on CPU, measured on the spot with a matmul."""
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        for word in ("NVIDIA ", "Tesla ", "GeForce ", "Quadro "):
            name = name.replace(word, "")
        peaks = GPU_PEAK_TFLOPS.get(name.strip())
        return None if peaks is None else peaks[0 if rt.dtype in ("bf16", "fp16") else 1] * 1e12
    if rt.device_type != "cpu":
        return None
    # the fastest of a few large square matmuls in the training dtype: the cores' best. Its own
    # generator: drawing from the global one would shift dropout's masks after a resume.
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=gen), torch.randn(2048, 2048, generator=gen)
    times = []
    with rt.autocast():
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / min(times[1:])


def mfu_percent(tok_s, flops, peak, rt):
    """(MFU in percent, None where the peak is unknown; the peak to use from now on). A CPU's peak
    is a measurement (peak_flops), which another process running at that moment undercuts: where a
    step seems to beat it, it is measured again and the best kept, so that an MFU above 100% means
    the machine was busy both times."""
    if not peak:
        return None, peak
    if rt.device_type == "cpu" and tok_s * flops > peak * rt.world_size:
        peak = max(peak, peak_flops(rt))
    return 100 * tok_s * flops / (peak * rt.world_size), peak
