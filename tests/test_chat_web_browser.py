"""
The chat page in a real browser: Debian's chromium (headless), driven by Playwright for Python,
against `python -m scripts.chat_web` serving the tiny memorising model of test_chat_web.py.
It loads the page, sends a message with Enter, watches the reply stream in, sends a second turn
(the history goes with it), starts a new chat in Chinese, stops a long reply, checks HTML
escaping and code blocks, and saves screenshots (pytest's tmp dir, and $NANOCHAT_TEST_ARTIFACTS
when set). Without /usr/bin/chromium it skips, except under CI=true where that is a failure.
Run: nice -n 10 python -m pytest tests/test_chat_web_browser.py -q
"""
import os
import shutil

import pytest

from test_chat_web import COUNT_REPLY, HELLO_REPLY, NIHAO_REPLY, SECOND_REPLY, TOOL_SECOND_REPLY, Server, make_base_dir

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    base = tmp_path_factory.mktemp("chat_web_browser_base")
    make_base_dir(str(base))
    # 0.03 s per token: a reply takes a visible fraction of a second, so the test sees it stream
    s = Server(str(base), tmp_path_factory.mktemp("logs") / "server.log", "--slow_down=0.03")
    try:
        yield s.wait()
    finally:
        s.stop()


def save_screenshot(page, tmp_path, name):
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=False)
    artifacts = os.environ.get("NANOCHAT_TEST_ARTIFACTS")
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        shutil.copy(path, os.path.join(artifacts, name))
    return path


def send(page, text):
    """Type and press Enter; returns once the page took the message (the user bubble is added and
    the page turns busy in one step; the reply may already be over)."""
    before = page.locator(".msg.user").count()
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")
    page.wait_for_function(f"document.querySelectorAll('.msg.user').length > {before}", timeout=10_000)


def wait_idle(page):
    page.wait_for_function("document.body.dataset.busy === 'false'", timeout=30_000)


def watch_last_reply(page):
    """Record every text the newest assistant bubble shows, to see the reply arrive in pieces."""
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const bubbles = document.querySelectorAll('.msg.assistant .bubble');
            if (bubbles.length) window.seen.push(bubbles[bubbles.length - 1].textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")


def last_reply(page):
    return page.locator(".msg.assistant .bubble").last.inner_text()


def check_python_tool_call(page, tmp_path):
    """A python tool call shows as a block (code, then what the sandbox printed); the page sends the
    reply back as text and the server turns the block into the call again: the model answers the next turn."""
    from playwright.sync_api import expect
    page.locator("#new-chat").click()
    send(page, "How many r are in strawberry?")
    wait_idle(page)
    tool = page.locator(".msg.assistant .tool")
    expect(tool.locator("code[data-lang=python]")).to_have_text("print('strawberry'.count('r'))")
    expect(tool.locator(".tool-output")).to_have_text("3")
    assert last_reply(page).startswith("Let me count.") and last_reply(page).endswith("The answer is 3.")
    send(page, "thanks")
    wait_idle(page)
    assert last_reply(page) == TOOL_SECOND_REPLY
    save_screenshot(page, tmp_path, "chat_web_python_tool.png")


def test_chat_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_contain_text("nanochat-chatsft-tiny")
            page.locator("#temperature").fill("0")  # greedy: the memorised replies, word for word
            expect(page.locator("#temperature-value")).to_have_text("0.00")

            # Shift+Enter is a newline; nothing is sent
            page.locator("#input").fill("hello")
            page.locator("#input").press("Shift+Enter")
            assert page.locator("#input").input_value() == "hello\n"
            assert page.locator(".msg").count() == 0

            # first turn: the reply streams in, then the page is idle again
            watch_last_reply(page)
            send(page, "hello")
            expect(page.locator(".msg.user .bubble").first).to_have_text("hello")
            wait_idle(page)
            assert last_reply(page) == HELLO_REPLY
            partial = [t for t in page.evaluate("window.seen") if t and t != HELLO_REPLY]
            assert len(set(partial)) >= 3 and all(HELLO_REPLY.startswith(t) for t in partial), partial
            assert page.locator("#input").input_value() == ""

            # second turn: the first one is sent along (the model answers it only in that context)
            send(page, "who made you?")
            wait_idle(page)
            assert last_reply(page) == SECOND_REPLY
            assert page.locator(".msg").count() == 4
            assert "tokens" in page.locator("#status").inner_text()
            save_screenshot(page, tmp_path, "chat_web_desktop.png")

            # a new chat, in Chinese
            page.locator("#new-chat").click()
            assert page.locator(".msg").count() == 0
            send(page, "你好")
            wait_idle(page)
            assert last_reply(page) == NIHAO_REPLY

            check_python_tool_call(page, tmp_path)

            # stop a long reply: it ends early, is kept, and the server's worker is free again
            page.locator("#new-chat").click()
            send(page, "count")
            page.wait_for_function("(document.querySelector('.msg.assistant .bubble') || {}).textContent?.length > 6")
            page.locator("#send").click()  # the Stop button while a reply streams
            wait_idle(page)
            stopped = last_reply(page)
            assert "stopped" in stopped and len(stopped) < len(COUNT_REPLY)
            for _ in range(50):  # freed within a token or so, not after the ~35 left
                if server.health()["active"] == 0:
                    break
                page.wait_for_timeout(100)
            assert server.health()["active"] == 0

            # HTML is shown, never interpreted; ``` fences become code blocks
            html = page.evaluate("renderMessage('a <b>x</b> `y`\\n```python\\nif a < b:\\n    print(\"<i>\")\\n```\\nok')")
            assert "<b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html and "<code>y</code>" in html
            assert '<pre><code data-lang="python">if a &lt; b:\n    print(&quot;&lt;i&gt;&quot;)</code></pre>' in html
            html = page.evaluate("renderMessage('x\\n[python]\\nprint(\"<b>\")\\n[output]\\n<b>\\n[/python]\\n[calc: 1+2 = 3]')")
            assert ('x<div class="tool"><pre><code data-lang="python">print(&quot;&lt;b&gt;&quot;)</code></pre>'
                    '<pre class="tool-output"><code>&lt;b&gt;</code></pre></div><span class="calc">1+2 = 3</span>') == html
            page.locator("#new-chat").click()
            page.locator("#temperature").fill("0.8")
            send(page, "<img src=x onerror=alert(1)> 中文")
            expect(page.locator(".msg.user .bubble")).to_have_text("<img src=x onerror=alert(1)> 中文")
            assert page.locator(".msg img").count() == 0
            wait_idle(page)

            # a phone-sized screen: nothing wider than the screen
            page.set_viewport_size({"width": 390, "height": 780})
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            save_screenshot(page, tmp_path, "chat_web_phone.png")
            assert errors == []
        finally:
            browser.close()
