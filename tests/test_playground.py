"""The playground page (GET /) in a real browser: Debian's chromium driven by Playwright, against `larp-rt serve`
on 127.0.0.1 and a free port, over the committed trained tiny pair (checkpoints/tiny) exported to a bundle.

The page is used as a person would: fields filled, buttons pressed. What it shows is checked against an offline
Engine: the tokens of its <pre id="tokens"> equal Engine.generate (or Engine.encode) of the same request, and its
<video> holds a clip of the tokenizer's T frames, counted one by one while it plays through.

Skipped (with the reason) only where Playwright or chromium is missing: `bash scripts/install_browser.sh` installs
both. Every wait is bounded, the browser is always closed and every server stopped. Screenshots go to
$LARP_RT_ARTIFACTS (default: the test's tmp_path); LARP_RT_UPDATE_SCREENSHOT=1 also writes docs/playground.png.
"""

import base64
import dataclasses
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
httpx = pytest.importorskip("httpx", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
torch = pytest.importorskip("torch")
try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("playwright is not installed: pip install 'larp_rt[dev]' (scripts/install_browser.sh installs it "
                "and chromium)", allow_module_level=True)

import test_serving_http as serving_test  # noqa: E402
from larp_rt.export import export_bundle  # noqa: E402
from larp_rt.training.data import SyntheticVideos  # noqa: E402

from larp_rt import Engine, SamplingParams  # noqa: E402
from larp_rt.serving.app import DEFAULT_MAX_BODY_BYTES  # noqa: E402
from larp_rt.video import fit_clip, read_video, to_frames, write_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "checkpoints" / "tiny"
WAIT = 30.0  # the bound of every wait (seconds): server start, page state, generation, decoding
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
                 "--disable-extensions", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                 "--mute-audio", "--autoplay-policy=no-user-gesture-required", "--password-store=basic",
                 "--use-mock-keychain"]


def chromium_path() -> str | None:
    exe = os.environ.get("LARP_RT_CHROMIUM")
    if exe:
        return exe if os.access(exe, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed: bash scripts/install_browser.sh (apt-get install chromium), or set "
                    "LARP_RT_CHROMIUM to a Chromium binary")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS, timeout=WAIT * 1000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    if not (TINY / "tokenizer").is_dir() or not (TINY / "generator").is_dir():
        pytest.fail(f"the committed trained tiny pair is missing: {TINY}")
    out = tmp_path_factory.mktemp("playground") / "bundle"
    return export_bundle(TINY / "tokenizer", TINY / "generator", out, printer=lambda s: None, onnx_only=True,
                         verify=False)


@pytest.fixture(scope="module")
def ref(bundle):
    """The offline engine the page's results are compared with (nothing shared with a server)."""
    return Engine(bundle, backend="onnxruntime", threads=1)


class Running(serving_test.Running):
    """test_serving_http's server over its own engine of ``bundle``, with the server's default body limit."""

    def __init__(self, bundle, **kw):
        kw.setdefault("max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        super().__init__(Engine(bundle, backend="onnxruntime", threads=1), **kw)


@pytest.fixture
def start(bundle):
    running = []

    def _start(**kw):
        running.append(Running(bundle, **kw))
        return running[-1]

    yield _start
    for r in running:
        r.stop()


@pytest.fixture
def artifacts(tmp_path):
    d = Path(os.environ.get("LARP_RT_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def page(browser, request, artifacts):
    """A fresh page (its own context: no sessionStorage shared between tests); a screenshot of it at the end.
    The server's Content-Security-Policy forbids eval, which Playwright's evaluate() uses, so these contexts bypass
    it; test_the_page_runs_under_its_own_csp runs the page under it."""
    ctx = browser.new_context(viewport={"width": 1200, "height": 820}, device_scale_factor=1, color_scheme="light",
                              bypass_csp=True)
    p = ctx.new_page()
    p.set_default_timeout(WAIT * 1000)
    errors = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield p
        assert not errors, f"uncaught errors in the page: {errors}"
    finally:
        try:
            shot = artifacts / f"playground-{request.node.name}.png"
            p.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
        except PlaywrightError as e:
            print(f"no screenshot: {e}")
        ctx.close()


def until(pred, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait(page, js: str, arg=None, timeout: float = WAIT):
    return page.wait_for_function(js, arg=arg, timeout=timeout * 1000)


def open_playground(page, url: str, *, ready: bool = True):
    page.goto(url + "/", timeout=WAIT * 1000)
    if ready:
        wait(page, "document.getElementById('status').textContent === 'Ready' && "
                   "document.querySelectorAll('#classes .class-id').length > 0")


def set_sampling(page, *, seed, fps=8, scale=4, **sampling):
    """Fill the fields given (cfg_scale, temperature, top_k, top_p; seed None: blank, the server draws one)."""
    for k, v in (*sampling.items(), ("seed", seed), ("fps", fps), ("scale", scale)):
        page.fill(f"#{k}", "" if v is None else str(v))


def run_to_video(page, button: str):
    """Press the button; wait for the progress bar to fill and for <video id="video"> to have its first frame."""
    page.click(button)
    wait(page, """() => { const p = document.getElementById('progress');
        return p.hasAttribute('value') && p.value > 0 && p.value === p.max
            || !document.getElementById('notice').hidden; }""")
    notice = page.locator("#notice")
    assert notice.is_hidden(), f"the page shows an error: {notice.text_content()}"
    wait(page, """() => { const v = document.getElementById('video');
        return v.readyState >= 2 && v.videoWidth > 0 || !!v.error || !document.getElementById('notice').hidden; }""")
    assert notice.is_hidden(), f"the page shows an error: {notice.text_content()}"
    assert page.evaluate("document.getElementById('video').error") is None


# the clip's frames: from frame 0 (after a seek to 0) requestVideoFrameCallback reports each frame shown while
# the video plays through. It may miss one under load (it is best effort), so the union of up to 4 passes.
COUNT_FRAMES = """async ([want, timeoutMs]) => {
    const v = document.getElementById('video');
    v.loop = false;
    const seen = new Set();
    const pass = () => new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('the video did not play through')), timeoutMs);
        v.pause();
        v.addEventListener('seeked', () => {
            seen.add(v.currentTime);
            const onFrame = (now, md) => {
                seen.add(md.mediaTime);
                if (!v.ended) v.requestVideoFrameCallback(onFrame);
            };
            v.requestVideoFrameCallback(onFrame);
            v.addEventListener('ended', () => setTimeout(() => { clearTimeout(timer); resolve(); }, 50), {once: true});
            v.play().catch(reject);
        }, {once: true});
        v.currentTime = 0;
    });
    let passes = 0;
    while (passes < 4 && (passes === 0 || seen.size < want)) { await pass(); passes++; }
    return {times: [...seen].sort((a, b) => a - b), passes, duration: v.duration, width: v.videoWidth,
            height: v.videoHeight};
}"""


def assert_clip(page, T: int, fps: float, height: int, width: int):
    """The <video> holds a T-frame clip at fps of this size, and every one of its frames was shown."""
    clip = page.evaluate(COUNT_FRAMES, [T, WAIT * 1000])
    assert (clip["width"], clip["height"]) == (width, height), clip
    assert abs(clip["duration"] * fps - T) < 0.5, clip
    # T distinct frames, one every 1 / fps from 0
    assert len(clip["times"]) == T and np.allclose(clip["times"], np.arange(T) / fps, atol=0.25 / fps), clip
    href, name = page.get_attribute("#download", "href"), page.get_attribute("#download", "download")
    assert href.startswith("blob:") and name.endswith(".mp4") and page.locator("#download").is_visible()
    # the download link holds the very mp4 that plays
    b64 = page.evaluate("""async (url) => { const b = new Uint8Array(await (await fetch(url)).arrayBuffer());
        let s = ''; for (const x of b) s += String.fromCharCode(x); return btoa(s); }""", href)
    return base64.b64decode(b64)


def page_tokens(page) -> np.ndarray:
    return np.array(json.loads(page.text_content("#tokens")))


def expected(engine, class_ids, seed, **sampling):
    return engine.generate(class_ids, dataclasses.replace(engine.default_params, **sampling, seed=seed)).tokens


def save_readme_screenshot(page, artifacts):
    """The page with its video playing; LARP_RT_UPDATE_SCREENSHOT=1 also copies it to docs/playground.png."""
    update = os.environ.get("LARP_RT_UPDATE_SCREENSHOT") == "1"
    page.evaluate("() => { const v = document.getElementById('video'); v.loop = true; v.play(); }")
    if update:
        page.mouse.move(0, 0)
        page.wait_for_timeout(3500)  # the player's controls fade out while it plays untouched
    shot = artifacts / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    if update:
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "playground.png")


# ------------------------------------------------------------------------------------------------
def test_generate_streams_progress_and_plays_the_offline_tokens(start, page, ref, tmp_path, artifacts):
    srv = start()
    open_playground(page, srv.url)
    C, T, H, W = ref.tokenizer_config.video_shape
    N = ref.generator_config.max_seq_len
    assert page.locator("#generate-card").is_visible() and page.locator("#roundtrip").is_visible()
    assert page.locator("#predict").is_hidden()  # a class-conditional bundle: no frame prediction
    assert "generate" in page.text_content("#tasks")

    # a server error ({"error": ...} of a 400) reaches the user
    set_sampling(page, cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.5, seed=7)
    page.click("#generate")
    wait(page, "!document.getElementById('notice').hidden")
    assert "top_p must be in (0, 1]" in page.text_content("#notice")

    # two classes (one grid video), explicit sampling parameters and seed
    page.locator("#classes .class-id").nth(0).fill("3")
    page.click("#add-class")
    page.locator("#classes .class-id").nth(1).fill("6")
    set_sampling(page, cfg_scale=2.0, temperature=0.9, top_k=200, top_p=0.95, seed=20240611, scale=4)
    run_to_video(page, "#generate")
    # the progress bar counted every step of both rows
    assert page.evaluate("[document.getElementById('progress').value, document.getElementById('progress').max]") \
        == [2 * N, 2 * N]
    assert page.text_content("#seed-out") == "20240611"
    want = expected(ref, [3, 6], 20240611, cfg_scale=2.0, temperature=0.9, top_k=200, top_p=0.95)
    got = page_tokens(page)
    assert got.shape == (2, N) and np.array_equal(got, want)
    # grid(): two 4x-scaled videos side by side with 2-pixel padding
    data = assert_clip(page, T, 8, height=4 * H + 4, width=2 * 4 * W + 6)
    (tmp_path / "page.mp4").write_bytes(data)
    frames, _ = read_video(tmp_path / "page.mp4")
    assert frames.shape == (T, 4 * H + 4, 2 * 4 * W + 6, 3)
    # the clip is the decoded tokens (H.264 is lossy: compare loosely with the offline decode)
    direct = np.concatenate([to_frames(v) for v in ref.decode(want)], axis=2)  # (T, H, 2W, 3)
    pix = frames[:, 4 : 4 + 4 * H : 4].astype(np.float32)  # the centre of each 4x4 block
    pix = np.concatenate([pix[:, :, 4 : 4 + 4 * W : 4], pix[:, :, 4 * W + 6 : 8 * W + 6 : 4]], axis=2)
    assert np.abs(pix - direct).mean() < 12, np.abs(pix - direct).mean()
    save_readme_screenshot(page, artifacts)


def test_api_key_prompt_then_generate(start, page, ref):
    srv = start(api_key="s3cret")
    open_playground(page, srv.url, ready=False)  # the page itself is public
    wait(page, "!document.getElementById('notice').hidden")
    assert "needs an API key" in page.text_content("#notice")
    assert "missing API key" in page.text_content("#notice")  # the server's own words
    assert page.text_content("#status") == "API key needed"
    assert page.locator("#generate-card").is_hidden()  # nothing to offer before /v1/models answers
    # a wrong key: the same prompt, the server says why
    page.fill("#api-key", "nope")
    page.click("#connect")
    wait(page, "document.getElementById('notice').textContent.includes('wrong API key')")
    page.fill("#api-key", "s3cret")
    page.click("#connect")
    wait(page, "document.getElementById('status').textContent === 'Ready'")
    assert page.locator("#notice").is_hidden() and page.locator("#generate-card").is_visible()
    assert page.evaluate("sessionStorage.getItem('larp_rt.api_key')") == "s3cret"
    # a blank seed: the server draws one (63 bits; the page keeps it exact) and the page shows it
    page.locator("#classes .class-id").nth(0).fill("5")
    set_sampling(page, cfg_scale=1.5, temperature=1.0, top_k=0, top_p=1.0, seed=None, scale=2)
    run_to_video(page, "#generate")
    seed = page.text_content("#seed-out")
    assert seed.isdigit(), seed
    assert np.array_equal(page_tokens(page), expected(ref, [5], int(seed), cfg_scale=1.5, temperature=1.0, top_k=0,
                                                      top_p=1.0))
    C, T, H, W = ref.tokenizer_config.video_shape
    assert_clip(page, T, 8, height=2 * H, width=2 * W)
    # a reload keeps the key for the session
    page.reload()
    wait(page, "document.getElementById('status').textContent === 'Ready'")
    assert page.input_value("#api-key") == "s3cret"


# what the page needs, no more: inline script and style, its own origin, blob: URLs for what it plays (and, in
# connect-src, for assert_clip's read of the download link)
def test_upload_encode_decode_round_trip(start, page, ref, tmp_path):
    srv = start()
    open_playground(page, srv.url)
    C, T, H, W = ref.tokenizer_config.video_shape
    clip = SyntheticVideos(4, frames=T + 2, height=H + 8, width=W + 16, seed=3).render(2)  # longer, larger
    path = write_video(tmp_path / "upload.mp4", to_frames(clip), fps=8)
    assert page.locator("#roundtrip").is_disabled()  # nothing chosen yet
    page.set_input_files("#file", str(path))
    page.fill("#scale", "3")
    run_to_video(page, "#roundtrip")
    frames, _ = read_video(path)
    fitted, _ = fit_clip(frames[:T], T, H, W)
    assert np.array_equal(page_tokens(page), ref.encode(fitted[None]))
    notes = page.text_content("#notes")
    assert f"kept the first {T} frames" in notes and "centre-cropped" in notes
    assert_clip(page, T, 8, height=3 * H, width=3 * W)
    assert page.locator("#source-fig").is_visible()  # the upload itself plays beside the reconstruction


def test_the_page_runs_under_its_own_csp(start, browser, ref, tmp_path):
    """The server's Content-Security-Policy (nothing from elsewhere, no eval, no framing) is enforced, and a round
    trip through the page still plays a clip with no violation reported. Waits go through locators only (they run
    outside the page's world; evaluate() would need eval)."""
    from playwright.sync_api import expect

    srv = start()
    csp = httpx.get(srv.url + "/", timeout=WAIT).headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        problems = []
        page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(srv.url + "/", timeout=WAIT * 1000)
        expect(page.locator("#status")).to_have_text("Ready", timeout=WAIT * 1000)
        C, T, H, W = ref.tokenizer_config.video_shape
        clip = SyntheticVideos(4, frames=T, height=H, width=W, seed=4).render(1)
        path = write_video(tmp_path / "in.mp4", to_frames(clip), fps=8)
        page.set_input_files("#file", str(path))
        page.click("#roundtrip")
        expect(page.locator("#download")).to_have_attribute("href", re.compile("^blob:"), timeout=WAIT * 1000)
        expect(page.locator("#video")).to_have_attribute("src", re.compile("^blob:"), timeout=WAIT * 1000)
        expect(page.locator("#notice")).to_be_hidden()
        page.wait_for_timeout(300)  # the clip loads: a blocked media-src would be reported by now
        frames, _ = read_video(path)
        assert np.array_equal(page_tokens(page), ref.encode(fit_clip(frames, T, H, W)[0][None]))
        assert not problems, problems
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def fp_bundle(tmp_path_factory):
    """The committed tiny tokenizer with the committed frame-prediction generator."""
    out = tmp_path_factory.mktemp("playground-fp") / "bundle"
    return export_bundle(TINY / "tokenizer", TINY / "fp_generator", out, printer=lambda s: None, onnx_only=True,
                         verify=False)


def test_predict_streams_progress_and_plays_the_offline_prediction(page, fp_bundle, tmp_path):
    """A frame-prediction bundle: its tasks list "predict", not "generate"; the upload box POSTs the clip with
    num_cond_frames and the sampling fields (streamed), the progress bar fills token by token, and the page's tokens
    equal Engine.predict of the same fitted clip and seed (2**64 - 1: past 2**53, shown exactly)."""
    srv = Running(fp_bundle)
    try:
        ref = Engine(fp_bundle, backend="onnxruntime", threads=1)
        C, T, H, W = ref.tokenizer_config.video_shape
        page.goto(srv.url + "/", timeout=WAIT * 1000)
        wait(page, "document.getElementById('status').textContent === 'Ready'")
        assert page.locator("#predict").is_visible() and page.locator("#generate-card").is_hidden()
        assert page.locator("#cfg-wrap").is_hidden()  # no classes, no CFG
        assert page.input_value("#num_cond_frames") == "5"
        clip = SyntheticVideos(4, frames=T, height=H + 8, width=W, seed=5).render(1)
        path = write_video(tmp_path / "upload.mp4", to_frames(clip), fps=8)
        page.set_input_files("#file", str(path))
        page.fill("#num_cond_frames", "3")
        seed = 2**64 - 1
        set_sampling(page, temperature=0.8, top_k=10, top_p=0.9, seed=str(seed), scale=2)
        run_to_video(page, "#predict")
        assert page.get_attribute("#progress", "max") == str(ref.generator_config.max_seq_len)
        assert page.text_content("#seed-out") == str(seed)
        frames, _ = read_video(path)
        fitted, _ = fit_clip(frames[:T], T, H, W)
        params = dataclasses.replace(ref.default_params, cfg_scale=1.0, temperature=0.8, top_k=10, top_p=0.9,
                                     seed=seed)
        _, gen = ref.predict(fitted[None], params, num_cond_frames=3)
        assert np.array_equal(page_tokens(page), gen.tokens)
        assert "centre-cropped" in page.text_content("#notes")
        assert_clip(page, T, 8, height=2 * H, width=2 * W)
    finally:
        srv.stop()


def test_without_h264_the_page_falls_back_to_a_gif(start, page, ref):
    """A browser that cannot play H.264 (canPlayType says so) gets the GIF of the same tokens in an <img>."""
    srv = start()
    page.add_init_script("HTMLMediaElement.prototype.canPlayType = () => '';")
    open_playground(page, srv.url)
    page.locator("#classes .class-id").nth(0).fill("2")
    set_sampling(page, seed=11, scale=2)
    page.click("#generate")
    wait(page, "document.getElementById('gif').complete && document.getElementById('gif').naturalWidth > 0 "
               "|| !document.getElementById('notice').hidden")
    assert page.locator("#notice").is_hidden(), page.text_content("#notice")
    C, T, H, W = ref.tokenizer_config.video_shape
    size = page.evaluate("() => { const g = document.getElementById('gif'); return [g.naturalWidth, g.naturalHeight] }")
    assert size == [2 * W, 2 * H]
    assert page.locator("#video-fig").is_hidden() and page.get_attribute("#download", "download").endswith(".gif")
    assert np.array_equal(page_tokens(page), expected(ref, [2], 11))  # the fields held the bundle's defaults


def test_stop_cancels_the_generation_on_the_server(start, page):
    """Stop aborts the fetch; the server sees the client go and cancels its rows. A request holding the scheduler's
    loop keeps the page's request waiting until then."""
    srv = start()
    sched = srv.server.scheduler
    entered, release = threading.Event(), threading.Event()

    def hold(step, total, token):
        if not entered.is_set():
            entered.set()
            release.wait(WAIT)

    holder = sched.submit(0, SamplingParams(seed=1), on_step=hold)
    try:
        assert entered.wait(WAIT)
        open_playground(page, srv.url)
        page.click("#generate")
        wait(page, "document.getElementById('status').textContent === 'Generating\u2026'")  # accepted, queued
        assert page.locator("#stop").is_enabled()
        page.click("#stop")
        wait(page, "document.getElementById('status').textContent === 'Stopped'")
        assert page.locator("#notice").is_hidden() and page.locator("#generate").is_enabled()
        # the server saw the stream's client go (the loop is still held: nothing of the request has run)
        until(lambda: 'outcome="disconnected",route="/v1/generate"' in httpx.get(srv.url + "/metrics").text,
              "the server to see the page disconnect")
    finally:
        release.set()
    until(lambda: sched.stats()["outcomes"].get("cancelled", 0) == 1, "the page's request to be cancelled")
    assert holder.result(timeout=WAIT).tokens.shape == (1, 64)  # the other request ran on
    assert sched.stats()["outcomes"].get("ok", 0) == 1
