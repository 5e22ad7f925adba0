"""What annotators see: our predictions in Label Studio's labeling UI, looked at in headless Chromium.

Label Studio places a region by code-point offsets (Python string indices).
The API hands back whatever offsets it was given, so a round trip through it
cannot catch offsets counted in other units; the labeling UI can: a region
that is off renders over the wrong characters. These tests open each task in
the real UI (Playwright driving Debian's ``chromium``, which ``make test``
installs) and compare every highlighted region's text with the entity that
was predicted, for CJK, emoji (ZWJ sequences, skin tones, flags) and CRLF
texts: once for predictions pushed with ``pipeline.labelstudio.push`` and once for
predictions Label Studio fetches itself from the service as its ML backend.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from pipeline.core.config import PushConfig
from pipeline.labelstudio.client import LabelStudioClient
from pipeline.labelstudio.labelconfig import read_label_config
from pipeline.labelstudio.push import push
from pipeline.labelstudio.regions import to_ls_prediction
from pipeline.runtime.inference import Entity, TextPrediction
from tests.conftest import FORCED_VERSION, ROOT
from tests.service_process import ServiceProcess

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; `make test` installs it (no `playwright install`)
CONFIG_PATH = ROOT / "data" / "labelstudio" / "label_config.xml"
CONFIG_XML = CONFIG_PATH.read_text(encoding="utf-8")
API_KEY = "ui-test-backend-key"
TIMEOUT_MS = 60_000  # shared 2-core machines: the labeling UI may take a while to render
LOADS = 3  # loads of a task's page before "nothing is drawn" fails: the full suite saw an empty page twice

FAMILY = "👨\u200d👩\u200d👧"   # ZWJ sequence: 5 code points, one grapheme
ASTRONAUT = "🧑🏾\u200d🚀"      # skin tone inside a ZWJ sequence
THUMBS = "👍🏽"                 # emoji + skin-tone modifier
FLAG = "🇯🇵"                    # two regional indicators

#: Hand-made predictions (pushed): each text with the substrings predicted as entities.
PUSHED = [
    ("我爱北京天安门，Obama 也来了。", [("北京", "geo-loc"), ("天安门", "facility"), ("Obama", "person")]),
    (f"😀😀 Barack Obama {FAMILY} visited New York City today!",
     [("Barack Obama", "person"), (FAMILY, "other"), ("New York City", "geo-loc")]),
    (f"{THUMBS}👋🏿 Angela Merkel met {ASTRONAUT} Elon Musk at Tesla in Berlin",
     [(f"{THUMBS}👋🏿", "other"), ("Angela Merkel", "person"), (f"{ASTRONAUT} Elon Musk", "person"),
      ("Tesla", "company"), ("Berlin", "geo-loc")]),
    ("Line one in London\r\nLine two in Paris\r\n", [("London", "geo-loc"), ("Paris", "geo-loc")]),
    (f"北京 😀 Apple {FAMILY} Google\r\n上海 Microsoft {THUMBS} New York {FLAG} 東京",
     [("北京", "geo-loc"), ("Apple", "company"), ("Google", "company"), ("上海", "geo-loc"),
      ("Microsoft", "company"), (f"{THUMBS} New York", "geo-loc"), (f"{FLAG} 東京", "geo-loc")]),
]

#: Texts the ML backend predicts on (the same hard cases, plus an entity that crosses a CRLF).
BACKEND_TEXTS = [text for text, _ in PUSHED] + ["Hello\r\nWorld again\r\n\r\nTokyo 東京 🇯🇵 Japan"]

#: The backend's model is the pipeline's tiny test model, which predicts nothing on these texts. Its CRF is
#: replaced by one that allows a single path: word pairs cycling through three labels (B I B I ...), so the
#: service's own word splitting and span building produce many entities: after emoji, across ZWJ sequences,
#: across CRLF, one per two CJK characters.
NO_SPACE = str.maketrans("", "", " \r\n")


def visible(text: str) -> tuple[str, ...]:
    """How a region's text shows up: Label Studio draws each CR and each LF as a line break, so a region across
    a line break is one highlight element per line, and the breaks themselves are not highlighted."""
    return tuple(part for part in re.split(r"[\r\n]+", text) if part)


def expected_regions(text: str, result: list[dict]) -> list[tuple[tuple[str, ...], str]]:
    """(highlighted text per line, label) for a prediction's regions in document order, from their offsets."""
    shown = []
    for region in sorted(result, key=lambda r: (r["value"]["start"], r["value"]["end"])):
        value = region["value"]
        # the region is internally consistent: its offsets, as Python string indices, select its text
        assert text[value["start"]:value["end"]] == value["text"], region
        shown.append((visible(value["text"]), value["labels"][0]))
    return shown


@pytest.fixture(scope="module")
def labeling_ui(label_studio):
    """A headless Chromium page logged in to the Label Studio server."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} missing: run `make chromium` (`make test` does; as root it installs Debian's "
                    "chromium with apt-get), or `sudo apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{label_studio.url}/user/login/")
            page.fill("#email", label_studio.username)
            page.fill("#password", label_studio.password)
            with page.expect_navigation():
                page.click("button[type=submit]")
            cookies = {c["name"] for c in page.context.cookies()}
            assert "sessionid" in cookies, f"login failed: {page.url}\n{page.locator('body').inner_text()[:1000]}"
            yield page
        finally:
            browser.close()


def settled_highlights(page, highlights, elements: int) -> list[list[str]]:
    """[text, region class, data-label] of every highlight element, read in one evaluation.

    Polls until ``elements`` of them are drawn (or TIMEOUT_MS passes, then returns what is there). Count and
    contents come from the same evaluation: the UI of an interactive backend may redraw a task right after
    drawing it, and a count checked first, then read, once saw the regions gone in between (CI, stop 29).
    """
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        drawn = highlights.evaluate_all("""els => els.map(e => [
            e.textContent,
            [...e.classList].find(c => c.startsWith('htx-highlight-')) || '',
            e.getAttribute('data-label') || ''])""")
        if len(drawn) == elements or time.monotonic() > deadline:
            return drawn
        page.wait_for_timeout(250)


def drawn_regions(page, server, project: int, task: int, elements: int) -> list[tuple[tuple[str, ...], str]]:
    """(text of each highlight element, label) per region as the labeling UI draws a task, in document order.

    Each region is drawn as ``.htx-highlight`` elements (one per line it covers) that share a
    ``htx-highlight-<region id>`` class; the last of them carries ``data-label="<number>:<label>"``.
    """
    highlights = page.locator(".htx-highlight")
    url = f"{server.url}/projects/{project}/data?task={task}"
    drawn: list = []
    for _ in range(LOADS):
        page.goto("about:blank")  # a fresh load of the app each time, not a navigation inside it
        page.goto(url)
        drawn = settled_highlights(page, highlights, elements)
        if drawn:
            break  # the expected count, or something else: the caller's comparison shows what is there
    else:
        # the page came up empty every time (seen in two full CI runs, never alone): say what it showed
        shown = page.locator("body").inner_text()[:1500]
        pytest.fail(f"task {task}: the labeling UI drew no region in {LOADS} loads of {url} (now at {page.url}); "
                    f"the page showed: {shown!r}\n{server.log_tail()}")
    regions: dict[str, tuple[list[str], list[str]]] = {}
    for i, (text, region, label) in enumerate(drawn):
        parts, labels = regions.setdefault(region or f"element {i}", ([], []))
        parts.append(text)
        labels += [label.split(":", 1)[-1]] if label else []
    return [(tuple(parts), ",".join(labels)) for parts, labels in regions.values()]


def hand_made(text: str, spans: list[tuple[str, str]], model_version: str) -> dict:
    """A task with a prediction of the given substrings, through our own formatter (as `predict` writes)."""
    config = read_label_config(CONFIG_PATH)
    entities = [Entity(text.index(sub), text.index(sub) + len(sub), sub, label, 0.9) for sub, label in spans]
    return {"data": {"text": text}, "predictions": [to_ls_prediction(TextPrediction(entities, 0.5), config,
                                                                      model_version)]}


def test_pushed_predictions_highlight_exactly_the_predicted_entities(label_studio, labeling_ui):
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    tasks = [hand_made(text, spans, "ui-pushed") for text, spans in PUSHED]
    project = client.create_project("labeling UI: pushed", CONFIG_XML)
    client.import_tasks(project, [{"data": t["data"]} for t in tasks])

    summary = push(client, project, tasks, PushConfig(match="text"))
    assert (summary.created, summary.failed) == (len(tasks), [])

    ids = {t["data"]["text"]: int(t["id"]) for t in client.iter_tasks(project)}
    for task, (text, spans) in zip(tasks, PUSHED):
        want = expected_regions(text, task["predictions"][0]["result"])
        assert want == [((sub,), label) for sub, label in sorted(spans, key=lambda s: text.index(s[0]))]
        assert drawn_regions(labeling_ui, label_studio, project, ids[text], len(want)) == want, repr(text)


def test_utf16_offsets_render_shifted(label_studio, labeling_ui):
    """The negative: offsets counted in UTF-16 units (as JavaScript counts) put a region after an astral
    character over the wrong text in the UI, so the test above would catch them."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
    text = f"😀{FAMILY} Barack Obama in 東京"
    entity = "Barack Obama"
    start = text.index(entity)
    astral_before = sum(ord(c) > 0xFFFF for c in text[:start])
    assert astral_before == 4  # 😀 and the family's three people; the ZWJs are in the BMP
    start16, end16 = start + astral_before, start + astral_before + len(entity)
    project = ls.projects.create(title="labeling UI: utf-16 offsets", label_config=CONFIG_XML)
    [task_id] = ls.projects.import_tasks(id=project.id, request=[{"text": text}], return_task_ids=True).task_ids
    ls.predictions.create(task=task_id, model_version="utf16", score=0.5, result=[{
        "id": "u16", "from_name": "label", "to_name": "text", "type": "labels",
        "value": {"start": start16, "end": end16, "text": entity, "labels": ["person"]}}])

    shown = drawn_regions(labeling_ui, label_studio, project.id, task_id, 1)
    assert shown == [((text[start16:end16],), "person")]  # placed by code points: four characters too far
    assert text[start16:end16] == "ck Obama in " != entity


@pytest.fixture(scope="module")
def backend(forced_onnx, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-ui") / "serve.log"
    with ServiceProcess(forced_onnx, log, env={"NER_API_KEY": API_KEY}) as proc:
        yield proc


def test_ml_backend_predictions_highlight_exactly_the_predicted_entities(label_studio, labeling_ui, backend):
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
    service = httpx.Client(base_url=backend.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    said = {t: r for t, r in zip(BACKEND_TEXTS, service.post("/v1/ner", json={"texts": BACKEND_TEXTS})
                                  .json()["results"])}
    project = ls.projects.create(title="labeling UI: ML backend", label_config=CONFIG_XML)
    ls.ml.create(project=project.id, url=backend.url, title="ner service", is_interactive=True,
                 auth_method="BASIC_AUTH", basic_auth_user="label-studio", basic_auth_pass=API_KEY)
    ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in BACKEND_TEXTS])
    ids = {t.data["text"]: t.id for t in ls.tasks.list(project=project.id)}
    assert set(ids) == set(BACKEND_TEXTS)
    # "Retrieve predictions": Label Studio posts the tasks to the service's /predict and stores the answers
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id,
                      selected_items={"all": True, "excluded": []})

    crossing_crlf = 0
    for text in BACKEND_TEXTS:
        # Label Studio may ask an interactive backend again when the UI opens a neighbouring task: every
        # prediction it holds for this task must then be the same one
        predictions = ls.predictions.list(task=ids[text])
        assert predictions, f"no prediction stored for {text!r}\n{label_studio.log_tail()}"
        prediction = predictions[0]
        assert {p.model_version for p in predictions} == {FORCED_VERSION}, label_studio.log_tail()
        assert all(p.result == prediction.result for p in predictions), [p.result for p in predictions]
        # what Label Studio stored is what the service says for the text
        assert sorted((r["value"]["start"], r["value"]["end"], r["value"]["text"]) for r in prediction.result) \
            == sorted((e["start"], e["end"], e["text"]) for e in said[text]["entities"])
        want = expected_regions(text, prediction.result)
        assert len(want) >= 3
        crossing_crlf += sum(len(parts) > 1 for parts, _ in want)
        elements = sum(len(parts) for parts, _ in want)
        drawn = drawn_regions(labeling_ui, label_studio, project.id, ids[text], elements)
        assert drawn == want, repr(text)
        # independent of our offsets: the forced model tags every word, so the highlights cover every
        # non-space character of the text once, in order (nothing skipped or doubled at an emoji or a CRLF)
        assert "".join("".join(parts) for parts, _ in drawn).translate(NO_SPACE) == text.translate(NO_SPACE)
    assert crossing_crlf >= 1  # one region spans a line break: drawn as one highlight per line
