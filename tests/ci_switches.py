"""The one place where the test suite departs from the configs users run (docs/decisions.md).

The tiny configs are the full configs at tiny size (tests/test_configs_inherit.py): bf16, gradient
checkpointing, EMA, flow, GAN, latent source, DRS, tiling mode and colour fix are the users' own in CI.
A test that cannot afford one of them appends ``SUITE_OVERRIDES[config]`` to its overrides; each entry
says why. Nothing else in tests/ switches a feature of a tiny config off for cost.
"""

SUITE_OVERRIDES: dict[str, list[str]] = {
    # latent_source=generated (stage2.yaml's) needs a stage-1 checkpoint and scripts/make_stage2_latents.py
    # before any step: minutes per test. Runs that test stage 2's other parts use the gt_noise proxy;
    # tests/training/test_precision.py::test_stage2_bf16_every_latent_source runs 'generated' itself.
    "configs/train/tiny_stage2.yaml": ["latent_source=gt_noise"],
}
