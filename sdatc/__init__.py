"""sdatc: diffusion-based compressed video super-resolution (x4) on Stable Diffusion 2.1.

    import sdatc
    pipe = sdatc.SDATCPipeline.from_sd21("stabilityai/stable-diffusion-2-1-base", checkpoint="weights/sdatc")
    frames_x4 = pipe(frames)             # (T, H, W, 3) uint8 -> (T, 4H, 4W, 3) uint8
"""

__version__ = "0.1.0"

__all__ = ["SDATCPipeline", "UltraVSRPipeline", "__version__"]


def __getattr__(name):  # lazy: `import sdatc` stays light (no torch/diffusers import until used)
    if name == "SDATCPipeline":
        from sdatc.pipelines.sdatc_pipeline import SDATCPipeline

        return SDATCPipeline
    if name == "UltraVSRPipeline":
        from sdatc.pipelines.ultravsr import UltraVSRPipeline

        return UltraVSRPipeline
    raise AttributeError(f"module 'sdatc' has no attribute {name!r}")
