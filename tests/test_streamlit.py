"""The Streamlit chat page: in-process through streamlit's AppTest, and as a user sees it: `streamlit run` in its own
process, a real headless Chromium typing a question (Chrome DevTools Protocol over a pipe) and a screenshot."""
import base64
import contextlib
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from transformers import AutoTokenizer

import tiny_chat_model as tiny
from model.checkpoint import load_model
from model.engine import Engine
from serving_helpers import start_process, stop, wait_healthy

ROOT = tiny.ROOT
PAGE = str(ROOT / "fast_inference.py")
QUESTION = tiny.CONVERSATIONS[0][0]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny.build_once(tmp_path_factory)


@pytest.fixture(scope="module")
def greedy_answer(paths):
    engine = Engine(load_model(paths[0]), AutoTokenizer.from_pretrained(paths[1]))
    return lambda messages: engine.complete(messages, temperature=0, max_new_tokens=200).text


def test_apptest_chat(paths, greedy_answer):
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(PAGE, default_timeout=900)
    at.run()
    at.sidebar.text_input(key="model_path").set_value(str(paths[0]))
    at.sidebar.text_input(key="tokenizer_path").set_value(str(paths[1]))
    at.sidebar.slider(key="temperature").set_value(0.0)
    at.sidebar.number_input(key="max_new_tokens").set_value(200)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]

    at.chat_input[0].set_value(QUESTION).run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    first = greedy_answer([{"role": "user", "content": QUESTION}])
    assert at.chat_message[1].markdown[0].value == first

    # multi-turn: the second answer sees the first exchange
    at.chat_input[0].set_value("长江有多长？").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"] * 2
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first},
               {"role": "user", "content": "长江有多长？"}]
    assert at.chat_message[3].markdown[0].value == greedy_answer(history)

    at.sidebar.button(key="clear").click().run()
    assert len(at.chat_message) == 0


def test_apptest_bad_model_path_is_reported():
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(PAGE, default_timeout=900)
    at.run()
    at.sidebar.text_input(key="model_path").set_value("no/such/model.pth").run()
    assert at.error and "no/such/model.pth" in at.error[0].value


class DevTools:
    """Chrome DevTools Protocol over --remote-debugging-pipe: JSON messages ending in NUL on fds 3 (in) and 4 (out)."""

    def __init__(self, chromium, args):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the child gets the pipe ends as fds 3 and 4 through bash redirections (from numbers >= 10, so the
        # two renumberings cannot clash; dash cannot name fds above 9)
        r, w = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        launch = f'exec "$0" "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-'
        self.proc = subprocess.Popen(["bash", "-c", launch, chromium, *args, "--remote-debugging-pipe"],
                                     pass_fds=(r, w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(r)
        os.close(w)
        self._buffer, self._next_id, self.session = b"", 0, None

    def call(self, method, params=None, timeout=900, **kw):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}, **kw}
        if self.session and "sessionId" not in kw:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:  # events and other replies are skipped
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise TimeoutError(method)

    def js(self, expression):
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"].get("value")

    def wait_for(self, expression, timeout=900):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"page never satisfied {expression}")

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def find_chromium():
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def serve_page(paths, *flags):
    """`streamlit run` of the page in its own process; yields its URL once it answers."""
    port = tiny.free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", PAGE, "--server.headless", "true", "--server.port", str(port),
           "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--client.toolbarMode", "minimal", "--",
           "--model", str(paths[0]), "--tokenizer", str(paths[1]), "--temperature", "0", *flags]
    proc, url = start_process(cmd, port)
    try:
        wait_healthy(proc, url, "/_stcore/health", ok=lambda r: r.text == "ok")
        yield url
    finally:
        stop(proc)


@pytest.fixture
def streamlit_page(paths):
    yield from serve_page(paths)


WIDTH, HEIGHT = 1280, 900


@contextlib.contextmanager
def open_browser(chromium, url):
    """Headless Chromium on the page, attached over the DevTools pipe."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    browser = DevTools(chromium, ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                  "--no-first-run", "--disable-component-update", "--disable-sync",
                                  "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
                                  f"--window-size={WIDTH},{HEIGHT}", "about:blank"])
    try:
        page = next(t for t in browser.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        browser.session = browser.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})[
            "sessionId"]
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
        browser.call("Page.navigate", {"url": url})
        yield browser
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)


def ask_in_browser(browser, question):
    """Type the question into the chat box and press Enter, as a user does."""
    box = 'document.querySelector(\'[data-testid="stChatInputTextArea"]\')'
    browser.wait_for(f"!!{box}", timeout=900)  # the page ran once and loaded the model
    browser.js(f"{box}.focus()")
    browser.call("Input.insertText", {"text": question})
    for kind in ("keyDown", "keyUp"):
        browser.call("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13,
                                                **({"text": "\r"} if kind == "keyDown" else {})})


@pytest.mark.slow  # streamlit run and headless Chromium
def test_chromium_screenshot_after_one_exchange(streamlit_page, tmp_path, greedy_answer):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    from PIL import Image

    width, height = WIDTH, HEIGHT
    with open_browser(chromium, streamlit_page) as browser:
        ask_in_browser(browser, QUESTION)
        messages = 'Array.from(document.querySelectorAll(\'[data-testid="stChatMessage"]\'))'
        browser.wait_for(f"{messages}.length >= 2", timeout=900)
        expected = greedy_answer([{"role": "user", "content": QUESTION}])
        # finished: the answer is all there and the app's "running" indicator is gone
        browser.wait_for(f"{messages}[1].innerText.includes({json.dumps(expected[-8:])}) && "
                         "!document.querySelector('[data-testid=\"stStatusWidget\"] button')", timeout=900)
        texts = browser.js(f"{messages}.map(m => m.innerText)")
        assert QUESTION in texts[0] and expected.strip() in texts[1].replace("\n", "")
        time.sleep(0.5)  # let the last paint land
        png = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"})["data"])

    shot = tmp_path / "streamlit_chat.png"
    shot.write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (width, height)
    colours = len(image.getcolors(maxcolors=width * height))
    assert len(png) > 20_000 and colours > 50, f"screenshot looks blank ({len(png)} bytes, {colours} colours)"


def test_apptest_tool_calls_results_and_folded_thinking(tmp_path_factory):
    """The tiny model trained on the format's tool calls and thinking: the page runs the demo's calculate tool,
    shows the call and its result, and folds the thought into a collapsible block above the answer."""
    from streamlit.testing.v1 import AppTest
    model_path, tok_dir = tiny.build_tool_once(tmp_path_factory)
    world_dir = tmp_path_factory.mktemp("world")
    (world_dir / "manifest.json").write_text('{"seed": 3, "params": {"n_entities": 64}}', encoding="utf-8")
    at = AppTest.from_file(PAGE, default_timeout=900)
    at.run()
    at.sidebar.text_input(key="model_path").set_value(str(model_path))
    at.sidebar.text_input(key="tokenizer_path").set_value(str(tok_dir))
    at.sidebar.slider(key="temperature").set_value(0.0)
    at.sidebar.number_input(key="max_new_tokens").set_value(60)
    at.sidebar.toggle(key="tools").set_value(True)
    at.run()
    at.sidebar.text_input(key="world_dir").set_value(str(world_dir))
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]

    at.chat_input[0].set_value("12*7等于多少？").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant", "tool", "assistant"]
    assert at.chat_message[1].code[0].value == 'calculate({"expression": "12*7"})'
    assert at.chat_message[2].code[0].value == "84"
    assert at.chat_message[3].markdown[0].value == "12*7等于84。"

    at.sidebar.button(key="clear").click()
    at.sidebar.toggle(key="tools").set_value(False).run()  # the model learned this question without tools
    at.chat_input[0].set_value("卡洛维出生在哪个国家？").run()
    (thought,) = at.expander  # (in the answer's chat message, under the placeholder the thought streamed into)
    assert thought.label == "💭 Thinking" and thought.markdown[0].value == "卡洛维出生在蒙莫城，蒙莫城位于索伦国。"
    assert at.chat_message[1].markdown[-1].value == "索伦国。"
    at.sidebar.radio(key="thinking").set_value("Off").run()  # the rerun shows the stored conversation again
    assert at.chat_message[1].expander[0].markdown[0].value == "卡洛维出生在蒙莫城，蒙莫城位于索伦国。"
    at.sidebar.button(key="clear").click().run()
    at.chat_input[0].set_value("卡洛维出生在哪个国家？").run()  # thinking off: the direct answer, no thought
    assert at.chat_message[-1].markdown[0].value == "蒙莫城。" and not at.expander


@pytest.fixture
def tool_page(tmp_path_factory):
    model_path, tok_dir = tiny.build_tool_once(tmp_path_factory)
    world_dir = tmp_path_factory.mktemp("world")
    (world_dir / "manifest.json").write_text('{"seed": 3, "params": {"n_entities": 64}}', encoding="utf-8")
    yield from serve_page((model_path, tok_dir), "--tools", str(world_dir))


@pytest.mark.slow  # streamlit run and headless Chromium
def test_chromium_shows_the_thought_folded_the_tool_call_and_its_result(tool_page):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    question = "先想一想：12*7等于多少？"
    with open_browser(chromium, tool_page) as browser:
        ask_in_browser(browser, question)
        messages = 'Array.from(document.querySelectorAll(\'[data-testid="stChatMessage"]\'))'
        # the page redraws its messages as the run ends: wait for the last draw, not for the first one seen
        browser.wait_for(f"{messages}.length >= 4 && {messages}[3].innerText.includes('等于84。') && "
                         f"{messages}[1].innerText.includes('calculate(') && "
                         "!document.querySelector('[data-testid=\"stStatusWidget\"] button')", timeout=900)
        texts = browser.js(f"{messages}.map(m => m.innerText)")
        assert question in texts[0]
        assert "💭 Thinking" in texts[1] and 'calculate({"expression": "12*7"})' in texts[1]
        assert "84" in texts[2] and "等于84。" in texts[3]
        details = f"{messages}[1].querySelector('details')"
        assert browser.js(f"!{details}.open")  # folded: the thought is one click away
        browser.js(f"{details}.querySelector('summary').click()")
        browser.wait_for(f"{messages}[1].innerText.includes('这要用计算器。')", timeout=60)
