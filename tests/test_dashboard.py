"""The dashboard in real headless Chromium: no console errors, a click shows a feature, the FAST-rubric distribution,
the delphi scores per quantile and the verdicts on the held-out windows match the CSV, and hostile text (from the data or
the LLM) stays text."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import chat_server, classifier_prompt_content, interpret_without_llm, write_jsonl
from fastsae.evaluate.evaluate_sae import EvalConfig, evaluate_sae
from fastsae.evaluate.sparse_probing import SPARSE_PROBING_FILE
from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
from fastsae.interpret.interpret_sae import InterpretConfig, interpret_sae
from fastsae.lm.data import load_dataset
from fastsae.train.train_sae import TrainConfig, train_saes

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = [
    "I planned to write <script>window.hacked = 1</script> in the report, then reconsidered.",
    'Maybe the title "><img src=x onerror="window.hacked = 2"> was a bad idea after all.',
]
# FAST-rubric answers from the local LLM server: an unreadable one, then every rating, with names that try to inject HTML.
RUBRIC_ANSWERS = ["no idea"] + [
    f'RATING: {rating}\nNAME: <img src=x onerror="window.hacked = 3"> {rating}' for rating in (1, 2, 3, 4, 5)
] * 10
HOSTILE_EXPLANATION = '<img src=x onerror="window.hacked = 4"> the word option'


def answer(messages: list[dict]) -> str:
    """An explanation that is markup, and detection / fuzzing verdicts that vary with the examples' text."""
    if "Text examples:" not in messages[-1]["content"]:
        return HOSTILE_EXPLANATION
    return str([len(text) % 2 for text in classifier_prompt_content(messages)[1]])


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, tiny_llama, smollm2_tokenizer, tiny_model_folder):
    """A dashboard built from a small dataset whose texts try to inject HTML and script."""
    folder = tmp_path_factory.mktemp("dashboard")
    texts = [f"Entry {n}: I keep thinking about option {n % 3} and whether it holds up." for n in range(60)] + HOSTILE * 10
    dataset_file = write_jsonl(folder / "texts.jsonl", [{"text": text, "label": "hostile" if "<" in text else "plain"} for text in texts])
    config = ExtractConfig(dataset=str(dataset_file), layers=[1], output_dir=str(folder / "activations"))
    (store,) = write_activation_stores(tiny_llama, smollm2_tokenizer, load_dataset(config.dataset), config, "tiny")
    (result,) = train_saes(
        TrainConfig(store=str(store), output_dir=str(folder / "checkpoints"), m=32, k=4, batch_size=128, epochs=5.0, buffer_tokens=1024)
    )
    evaluate_sae(
        EvalConfig(
            checkpoint=[result["checkpoint"]], evals=["sparse_probing"], probing_k=[1, 2], model_name=str(tiny_model_folder), device="cpu"
        )
    )
    with pytest.MonkeyPatch.context() as monkeypatch, chat_server(monkeypatch) as server:
        server.rubric_answers, server.answerer = list(RUBRIC_ANSWERS), answer
        csv = interpret_sae(
            InterpretConfig(
                checkpoint=result["checkpoint"],
                model_name=str(tiny_model_folder),
                features="all",
                interpretations_path=str(folder / "interpretations.csv"),
                scoring="detection,fuzzing,fast-rubric",
                explain_examples=10,
                score_examples=10,
                n_quantiles=5,
                min_windows=10,
                llm_cache_dir=str(folder / "llm-cache"),
                device="cpu",
            )
        )
    return csv.with_name("dashboard.html")


@contextmanager
def open_page(path: Path) -> Iterator:
    """`path` in headless Chromium; `page.errors` collects console errors and uncaught exceptions."""
    if CHROMIUM is None:
        pytest.fail("Chromium is not installed: apt-get install chromium (.ci/run does).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.errors = []
        page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(path.resolve().as_uri())
        yield page
        browser.close()


@pytest.fixture
def page(dashboard):
    with open_page(dashboard) as page:
        yield page


def test_clicking_a_feature_shows_its_contexts_with_activations(page, tmp_path):
    rows = page.locator("tr.feature")
    assert rows.count() > 5
    rows.nth(1).click()
    assert page.locator("#detail h1").inner_text().startswith("Feature ")
    tokens = page.locator("#detail .context .token")
    assert tokens.count() > 0
    assert page.locator("#detail .context .focus").first.get_attribute("title").startswith("activation ")
    page.select_option("#sort", "feature")
    first_ids = [int(text) for text in page.locator("tr.feature td:first-child").all_inner_texts()[:3]]
    assert first_ids == sorted(first_ids)
    page.screenshot(path=str(tmp_path / "dashboard.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert page.errors == []


def test_hostile_text_is_shown_as_text(page):
    page.select_option("#label", "hostile")
    hostile_rows = page.locator("tr.feature")
    assert hostile_rows.count() > 0
    shown = []
    for index in range(hostile_rows.count()):
        hostile_rows.nth(index).click()
        shown += page.locator("#detail .context").all_inner_texts()
    assert any("<script>" in text or "<img" in text for text in shown)  # the markup is there, as visible text
    assert page.evaluate("window.hacked") is None
    assert page.locator("#detail img").count() == 0 and page.locator("#detail script").count() == 0
    assert page.errors == []


def test_the_rubric_distribution_and_ratings_match_the_csv(page, dashboard):
    table = pd.read_csv(dashboard.with_name("interpretations.csv"))
    ratings = table["fast_rubric_rating"].dropna().astype(int)
    counts = [int(text) for text in page.locator("#rubric tr .count").all_inner_texts()]
    assert counts == [int((ratings == rating).sum()) for rating in range(1, 6)] and sum(counts) == len(ratings) > 5
    share = (ratings >= 4).mean()
    assert page.locator("#rubric .headline").inner_text() == f"rated 4–5: {100 * share:.1f}% of {len(ratings)} rated; unreadable answers: 1"
    page.select_option("#sort", "fast_rubric_rating")
    listed = page.locator("tr.feature td.rating").all_inner_texts()
    assert listed[: len(ratings)] == [str(rating) for rating in sorted(ratings, reverse=True)]
    page.locator("tr.feature").first.click()  # a 5, whose name is markup: shown as text
    assert page.locator("#detail .rubric").inner_text() == 'FAST rubric: 5/5 · <img src=x onerror="window.hacked = 3"> 5'
    assert page.locator("img").count() == 0 and page.evaluate("window.hacked") is None
    assert page.errors == []


def test_scores_per_quantile_and_verdicts_on_held_out_windows_match_the_csv(page, dashboard):
    table = pd.read_csv(dashboard.with_name("interpretations.csv")).set_index("feature")
    scored = table[table["detection_score"].notna()]
    assert len(scored) > 3 and (table["scoring_note"].notna() | table["detection_score"].notna()).all()
    page.select_option("#sort", "detection_score")
    listed = page.locator("tr.feature td.detection").all_inner_texts()
    assert listed[: len(scored)] == [f"{score:.2f}" for score in sorted(scored["detection_score"], reverse=True)]
    page.locator("tr.feature").first.click()
    feature = int(page.locator("#detail h1").inner_text().removeprefix("Feature "))
    row = scored.loc[feature]
    assert page.locator("#detail .explanation").inner_text() == HOSTILE_EXPLANATION  # markup from the LLM, shown as text
    for scorer in ("detection", "fuzzing"):
        cells = page.locator(f'#detail table.quantiles tr[data-scorer="{scorer}"] td').all_inner_texts()
        expected = ["–" if accuracy is None else f"{accuracy:.2f}" for accuracy in json.loads(row[f"{scorer}_quantile_accuracy"])]
        assert cells == [scorer, *expected, f"{row[f'{scorer}_non_activating_accuracy']:.2f}"]
        # The balanced accuracy of the verdicts shown on the held-out windows is the CSV's score.
        activating = page.locator("#detail .held-out[data-activating=true]")
        silent = page.locator("#detail .held-out[data-activating=false]")
        assert activating.count() == 10 and silent.count() == 10
        hits = activating.locator(f".verdict.right:text-is('{scorer}: yes')").count()
        rejections = silent.locator(f".verdict.right:text-is('{scorer}: no')").count()
        assert (hits / 10 + rejections / 10) / 2 == pytest.approx(row[f"{scorer}_score"])
    assert page.locator("img").count() == 0 and page.evaluate("window.hacked") is None
    assert page.errors == []


def test_a_feature_shows_the_labels_whose_sparse_probes_chose_it(page, dashboard):
    (probing_file,) = dashboard.parent.glob(f"checkpoints/*/*/{SPARSE_PROBING_FILE}")
    tasks = json.loads(probing_file.read_text())["tasks"]
    first = tasks["hostile"]["features"][0]
    page.locator(f'tr.feature[data-feature="{first["feature"]}"]').click()
    shown = page.locator("#detail li.probe").all_inner_texts()
    side = "more" if first["mean_difference"] >= 0 else "less"
    assert shown[0].startswith(f"hostile: rank 1 (in every probe with k ≥ 1); fires {side} on it")
    assert len(shown) == sum(first["feature"] in {f["feature"] for f in task["features"]} for task in tasks.values())
    page.fill("#filter", "multiclass")
    chosen = {f["feature"] for f in tasks["all labels (multiclass)"]["features"]}
    assert {int(text) for text in page.locator("tr.feature td:first-child").all_inner_texts()} == chosen
    assert page.errors == []


@pytest.fixture(scope="module")
def half_dead_dashboard(tmp_path_factory, tiny_llama, smollm2_tokenizer, tiny_model_folder):
    """A dashboard of every feature of an SAE whose even features never fire (no windows at all), on texts with runs of
    long tokens and HTML's special characters."""
    folder = tmp_path_factory.mktemp("half-dead")
    texts = [f"Entry {n}: a < b && c > \"d\" 'e' {'=' * 400 if n % 3 == 0 else 'then'} {'_' * 300}." for n in range(40)]
    dataset_file = write_jsonl(
        folder / "texts.jsonl", [{"text": text, "label": "<b>&" if n % 2 else "plain"} for n, text in enumerate(texts)]
    )
    config = ExtractConfig(dataset=str(dataset_file), layers=[1], output_dir=str(folder / "activations"))
    (store,) = write_activation_stores(tiny_llama, smollm2_tokenizer, load_dataset(config.dataset), config, "tiny")
    (result,) = train_saes(
        TrainConfig(store=str(store), output_dir=str(folder / "checkpoints"), m=16, k=4, batch_size=128, epochs=2.0, buffer_tokens=1024)
    )
    payload = torch.load(result["checkpoint"], weights_only=True)
    payload["state_dict"]["neuron_bias"][::2] = -1e6  # a real checkpoint whose even features are dead
    checkpoint = folder / "SAE_M=16_K=4.pt"
    torch.save(payload, checkpoint)
    return interpret_without_llm(checkpoint, tiny_model_folder, folder / "interpretations.csv", "all").with_name("dashboard.html")


def test_every_feature_renders_within_the_page_with_its_maximum_marked(half_dead_dashboard):
    """A run of long tokens (a 400-character "====" line) had no break opportunity: the page grew 4x wider than the window,
    the heatmap scrolling sideways. Every feature, dead ones too, renders without a script error, and each window marks
    its strongest token."""
    with open_page(half_dead_dashboard) as page:
        rows = page.locator("tr.feature")
        assert rows.count() == 16
        for index in range(16):
            rows.nth(index).click()
            detail = page.locator("#detail")
            assert detail.evaluate("node => node.scrollWidth <= node.clientWidth"), page.locator("#detail h1").inner_text()
            for context in detail.locator(".context").all():
                activations = [
                    float(title.removeprefix("activation ")) for title in context.locator(".token").evaluate_all("s => s.map(t => t.title)")
                ]
                focus = float(context.locator(".focus").get_attribute("title").removeprefix("activation "))
                assert focus == max(activations) > 0
        dead = [int(text) for text in page.locator("tr.feature td:first-child").all_inner_texts()[-8:]]
        assert sorted(dead) == list(range(0, 16, 2))  # dead features list last, by frequency, and still open
        rows.nth(15).click()  # a dead one: its empty windows section says why
        assert "None: the feature fires on no counted token of the store." in page.locator("#detail").inner_text()
        rows.nth(0).click()
        tips = page.locator("#detail svg rect title").evaluate_all("titles => titles.map(t => t.textContent)")
        assert re.fullmatch(r"\d+ activations in \(0\.0010, 0\.0013\]", tips[0])  # torch.bucketize's bins: an edge is in the lower one
        assert page.evaluate("window.hacked") is None and page.errors == []
