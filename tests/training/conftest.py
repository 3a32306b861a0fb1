import pytest


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, bunny_frames):
    """One real clip: 6 frames of bigbuckbunny, a 192x192 crop, as PNGs."""
    from sdatc.data.video import write_frames

    root = tmp_path_factory.mktemp("train_data")
    write_frames(root / "bunny", bunny_frames[:, 200:392, 500:692])
    return root
