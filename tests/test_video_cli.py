import json

import numpy as np
import pytest
import torch

from larp_rt import GeneratorConfig, TokenizerConfig, save_pretrained
from larp_rt.cli import main
from larp_rt.models import LARPGenerator, LARPTokenizer
from larp_rt.video import VideoError, fit_clip, grid, read_video, to_frames, write_video


def moving_square(T=12, H=40, W=56):
    f = np.zeros((T, H, W, 3), np.uint8)
    for t in range(T):
        f[t, 10:20, 3 * t : 3 * t + 10] = (250, 40, 40)
    return f


@pytest.mark.parametrize("ext", [".mp4", ".gif", ".npy"])
def test_write_and_read_back(tmp_path, ext):
    frames = moving_square()
    p = write_video(tmp_path / f"v{ext}", frames, fps=10)
    assert p.exists() and not [q for q in tmp_path.iterdir() if q.name.startswith(".")]
    if ext == ".npy":
        assert np.array_equal(np.load(p), frames)
        return
    back, fps = read_video(p)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 12  # lossy codecs, same content
    assert fps == pytest.approx(10, rel=0.05)


def test_odd_sizes_are_padded_for_h264(tmp_path):
    back, _ = read_video(write_video(tmp_path / "odd.mp4", moving_square(H=33, W=47)))
    assert back.shape[1:3] == (34, 48)


def test_fit_clip_reports_what_it_did():
    clip, notes = fit_clip(moving_square(T=12, H=40, W=56), 8, 32, 32)
    assert clip.shape == (8, 32, 32, 3)
    assert any("first 8 of 12" in n for n in notes) and any("centre-cropped to 32x32" in n for n in notes)
    clip, notes = fit_clip(moving_square(T=5, H=32, W=32), 8, 32, 32)
    assert clip.shape == (8, 32, 32, 3) and notes == ["padded 5 frames to 8 by repeating the last"]
    assert np.array_equal(clip[-1], clip[4])


def test_grid_layout():
    v = np.zeros((3, 3, 4, 8, 8), np.float32)
    v[1] = 1.0
    g = grid(v, cols=2, pad=1, scale=2)
    assert g.shape == (4, 2 * 16 + 3, 2 * 16 + 3, 3)
    assert (g[:, 1:17, 18:34] == 255).all() and (g[:, 1:17, 1:17] == 0).all()
    assert to_frames(v[1]).shape == (4, 8, 8, 3)


def test_video_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video")
    with pytest.raises(VideoError, match="cannot read video"):
        read_video(bad)
    with pytest.raises(VideoError, match="does not exist"):
        read_video(tmp_path / "none.mp4")
    with pytest.raises(VideoError, match="unsupported output"):
        write_video(tmp_path / "x.avi", moving_square())
    with pytest.raises(VideoError, match="uint8"):
        write_video(tmp_path / "x.mp4", moving_square().astype(np.float32))
    assert not list(tmp_path.glob("x.*"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    tok = LARPTokenizer(TokenizerConfig.from_name("tiny"))
    torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.05)
    gen = LARPGenerator(GeneratorConfig.from_name("tiny"))
    torch.nn.init.normal_(gen.output.weight, std=0.1)
    return save_pretrained(tok, root / "tok"), save_pretrained(gen, root / "gen"), root


def test_cli_export_generate_encode_decode_bench(ckpts, capsys):
    tok, gen, root = ckpts
    bundle = root / "bundle"
    assert main(["export", str(bundle), "--tokenizer", str(tok), "--generator", str(gen)]) == 0
    assert "decode   logits" in capsys.readouterr().out
    assert main(["export", str(bundle), "--tokenizer", str(tok)]) == 2
    assert "already exists" in capsys.readouterr().err
    out = root / "s.mp4"
    assert main(["generate", str(bundle), "--classes", "0,3,5", "--seed", "0", "--out", str(out)]) == 0
    assert "seeds: [0, 0, 0]" in capsys.readouterr().out
    frames, _ = read_video(out)
    assert frames.shape[0] == 8
    assert main(["generate", str(bundle), "--classes", "1", "--seed", "4", "--out", str(root / "t.npy")]) == 0
    assert np.load(root / "t.npy").shape == (1, 64)
    src = write_video(root / "in.mp4", moving_square(T=12, H=48, W=64))
    assert main(["encode", str(bundle), str(src), "--out", str(root / "tokens.npy")]) == 0
    text = capsys.readouterr().out
    assert "note: kept the first 8 of 12 frames" in text and "centre-cropped" in text
    assert np.load(root / "tokens.npy").shape == (1, 64)
    assert main(["decode", str(bundle), str(root / "tokens.npy"), "--out", str(root / "out.gif")]) == 0
    assert read_video(root / "out.gif")[0].shape[0] == 8
    assert main(["bench", str(bundle), "--repeats", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rows = json.loads(last)["results"]
    assert {r["backend"] for r in rows} == {"onnxruntime", "torch"} and all(r["per_token_ms"] > 0 for r in rows)


def test_cli_reports_bad_input(ckpts, capsys):
    tok, gen, root = ckpts
    assert main(["generate", str(root / "missing"), "--classes", "0", "--out", str(root / "x.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bundle = root / "bundle2"
    assert main(["export", str(bundle), "--generator", str(gen)]) == 0
    assert main(["generate", str(bundle), "--classes", "0,99", "--out", str(root / "x.npy")]) == 2
    assert "class_ids must be in [0, 7]" in capsys.readouterr().err
    assert main(["generate", str(bundle), "--classes", "a", "--out", str(root / "x.npy")]) == 2
    assert main(["generate", str(bundle), "--classes", "1", "--top-p", "0", "--out", str(root / "x.npy")]) == 2
    assert "top_p" in capsys.readouterr().err
    (root / "junk.mp4").write_bytes(b"junk")
    assert main(["export", str(root / "b3"), "--tokenizer", str(tok)]) == 0
    assert main(["encode", str(root / "b3"), str(root / "junk.mp4"), "--out", str(root / "t.npy")]) == 2
    assert "cannot read video" in capsys.readouterr().err
    assert not (root / "x.npy").exists()
