"""Steering: α = 0 is the unhooked model, a large α changes the answer, clamp and ablate do what they say,
the hook never outlives its block, and the script writes an escaped Markdown and HTML table."""

from __future__ import annotations

import dataclasses
import io
import runpy
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import FAMILY_SHAPES, hypothesaes_module, save_tiny_llama_with_blocks, write_jsonl
from fastsae.common.config import run_step
from fastsae.common.errors import UserError
from fastsae.core.checkpoint import load_sae
from fastsae.core.sae import SAESpec, SparseAutoencoder
from fastsae.core.trained_sae import open_trained_sae
from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
from fastsae.lm.data import Example, load_dataset
from fastsae.lm.hook_points import ResidualCapture, hook_site
from fastsae.lm.models import EMBEDDED_MODEL
from fastsae.lm.tokenization import prompt_token_ids
from fastsae.tools.steer_model import FeatureSteering, SteerConfig, generate, prompt_examples, steer_model, steering
from fastsae.train.train_sae import TrainConfig, train_saes

SCRIPT = Path(__file__).resolve().parents[1] / "steer_model.py"
PROMPT = Example(row=0, source="test", text="What should I do this weekend?")
TINY_LAYER, SMOLLM2_LAYER = 2, 12


def train_small_sae(store: Path, output: Path, epochs: float) -> Path:
    config = TrainConfig(
        store=str(store), output_dir=str(output), m=64, k=4, batch_size=256, epochs=epochs, eval_every=20, log_every=5, buffer_tokens=4096
    )
    (result,) = train_saes(config)
    return Path(result["checkpoint"])


def most_frequent_feature(checkpoint: Path) -> int:
    """The feature that fires on most content tokens of the store the SAE was trained on."""
    trained = open_trained_sae(checkpoint)
    store = trained.open_store()
    codes = trained.sae.encode(store.activations(0, store.n_tokens).float()[~torch.from_numpy(store.special_mask(0, store.n_tokens))])
    return int((codes > 0).sum(0).argmax())


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_store, tmp_path_factory) -> Path:
    return train_small_sae(tiny_store, tmp_path_factory.mktemp("steer-tiny"), epochs=1.0)


@pytest.fixture(scope="module")
def smollm2(smollm2_model):
    return smollm2_model


@pytest.fixture(scope="module")
def smollm2_checkpoint(smollm2, smollm2_tokenizer, tmp_path_factory) -> Path:
    """An SAE on SmolLM2's layer 12 from 32 examples (two batches of training tokens): enough for features that fire, in seconds."""
    config = ExtractConfig(layers=[SMOLLM2_LAYER], max_examples=32, output_dir=str(tmp_path_factory.mktemp("steer-smollm2-store")))
    dataset = load_dataset(config.dataset, max_examples=config.max_examples)
    (store,) = write_activation_stores(smollm2, smollm2_tokenizer, dataset, config, "SmolLM2-135M-Instruct", {"model_name": EMBEDDED_MODEL})
    return train_small_sae(store, tmp_path_factory.mktemp("steer-smollm2-sae"), epochs=5.0)


def test_alpha_zero_is_the_unhooked_model_a_large_alpha_changes_it_and_the_hook_goes_away(smollm2, smollm2_tokenizer, smollm2_checkpoint):
    sae = load_sae(smollm2_checkpoint).sae
    site = hook_site(smollm2, SMOLLM2_LAYER, "resid_post")
    hooks_before = dict(site.module._forward_hooks)  # transformers may keep its own output-capturing hooks there
    ids = prompt_token_ids(smollm2_tokenizer, PROMPT, use_chat_template=True)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        clean_logits = smollm2(input_ids).logits
    clean = generate(smollm2, ids, 1, 6, 0.0, 0, smollm2_tokenizer.pad_token_id)
    hook = FeatureSteering(sae, [most_frequent_feature(smollm2_checkpoint)], "add", [0.0, 100.0])
    with steering(site, hook):
        steered = generate(smollm2, ids, 2, 6, 0.0, 0, smollm2_tokenizer.pad_token_id)
    assert torch.equal(steered[0], clean[0])  # token for token
    assert not torch.equal(steered[1], clean[0])
    with torch.no_grad():
        assert torch.equal(smollm2(input_ids).logits, clean_logits)
    with pytest.raises(RuntimeError, match="in the middle"):
        with steering(site, FeatureSteering(sae, [0], "add", [100.0])):
            raise RuntimeError("in the middle")
    assert dict(site.module._forward_hooks) == hooks_before
    with torch.no_grad():
        assert torch.equal(smollm2(input_ids).logits, clean_logits)


def captured_at_hook(model, ids: list[int]) -> torch.Tensor:
    """The hook's output as the model's next block reads it (after any steering hook), (T, d)."""
    input_ids = torch.tensor([ids])
    return ResidualCapture(model, [TINY_LAYER], "resid_post")(input_ids, torch.ones_like(input_ids))[TINY_LAYER][0]


def test_add_clamp_and_ablate_move_the_activation_as_they_say(tiny_llama, smollm2_tokenizer, tiny_checkpoint):
    sae = load_sae(tiny_checkpoint).sae
    site = hook_site(tiny_llama, TINY_LAYER, "resid_post")
    hooks_before = dict(site.module._forward_hooks)  # transformers may keep its own output-capturing hooks there
    ids = prompt_token_ids(
        smollm2_tokenizer,
        Example(row=0, source="test", text="Looking back, I should have checked the numbers twice."),
        use_chat_template=True,
    )
    clean = captured_at_hook(tiny_llama, ids)
    with torch.no_grad():
        codes = sae.encode(clean)
    feature = int((codes > 0).sum(0).argmax())  # the feature firing on most of this prompt's tokens
    before = codes[:, feature]
    direction = sae.W_dec.detach()[feature]
    assert (before > 0).sum() >= 3  # the feature fires on this prompt, so ablating it means something

    with steering(site, FeatureSteering(sae, [feature], "add", [7.0])):
        added = captured_at_hook(tiny_llama, ids)
    torch.testing.assert_close((added - clean).norm(dim=1), torch.full((len(ids),), 7.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(added - clean, 7.0 * direction / direction.norm() * torch.ones(len(ids), 1), rtol=1e-4, atol=1e-4)

    with steering(site, FeatureSteering(sae, [feature], "ablate", [1.0])):
        ablated = captured_at_hook(tiny_llama, ids)
    torch.testing.assert_close(ablated - clean, -before[:, None] * direction, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        after = sae.encode(ablated)[:, feature]
    assert float(after.abs().max()) < 0.1 * float(before.max())  # the SAE no longer sees the feature

    clamp_value = 3.0 * float(before.max())
    with steering(site, FeatureSteering(sae, [feature], "clamp", [1.0], clamp_value)):
        clamped = captured_at_hook(tiny_llama, ids)
    torch.testing.assert_close(clamped - clean, (clamp_value - before)[:, None] * direction, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        reads = sae.encode(clamped)[:, feature]
    # Exact in the SAE's decomposition (above); read back through the encoder, which is not the decoder's
    # inverse, it lands near the clamp value.
    relative_error = (reads - clamp_value).abs() / clamp_value
    assert float(relative_error.median()) < 0.1 and float(relative_error.max()) < 0.35
    assert dict(site.module._forward_hooks) == hooks_before


def test_steering_a_sublayer_the_block_scales_moves_the_residual_stream_by_alpha():
    """Granite adds 0.22 × its MLP's output: its mlp_out (what the SAE reads) is that product, so α is a distance in
    the residual stream there too, not 0.22·α."""
    torch.manual_seed(0)
    granite = AutoModelForCausalLM.from_config(AutoConfig.for_model("granite", **FAMILY_SHAPES, residual_multiplier=0.22)).eval()
    sae = SparseAutoencoder(SAESpec("topk", FAMILY_SHAPES["hidden_size"], 128, 8)).eval()
    direction = sae.W_dec.detach()[3]
    input_ids = torch.randint(3, FAMILY_SHAPES["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(0))

    def block_output() -> torch.Tensor:
        return ResidualCapture(granite, [1], "resid_post")(input_ids, torch.ones_like(input_ids))[1][0]

    clean = block_output()
    with steering(hook_site(granite, 1, "mlp_out"), FeatureSteering(sae, [3], "add", [5.0])):
        steered = block_output()
    torch.testing.assert_close(steered - clean, 5.0 * direction / direction.norm() * torch.ones(10, 1), rtol=1e-4, atol=1e-4)


def test_bad_features_and_hooks_the_model_lacks_are_clear_errors(tiny_checkpoint, tiny_model_folder, smollm2_tokenizer, tmp_path):
    with pytest.raises(UserError, match="feature 64 does not exist: this SAE has M=64 features, numbered 0..63"):
        steer_model(SteerConfig(checkpoint=str(tiny_checkpoint), model_name=str(tiny_model_folder), features=[3, 64], device="cpu"))
    two_blocks = tmp_path / "two-block-llama"
    save_tiny_llama_with_blocks(two_blocks, smollm2_tokenizer, 2)
    with pytest.raises(UserError, match=r"reads blocks\.2\.hook_resid_post, but this model has 2 blocks .* Set MODEL"):
        steer_model(SteerConfig(checkpoint=str(tiny_checkpoint), model_name=str(two_blocks), features=[3], device="cpu"))
    theirs = Path(hypothesaes_module().SparseAutoencoder(64, 32, 4, device="cpu").save(str(tmp_path / "SAE_M=32_K=4.pt")))
    with pytest.raises(UserError, match="does not record the hook .* set HOOK_POINT"):
        steer_model(SteerConfig(checkpoint=str(theirs), model_name=str(tiny_model_folder), features=[3]))
    named = SteerConfig(checkpoint=str(theirs), model_name=str(tiny_model_folder), features=[3], hook_point="resid_post", layer=2)
    table = steer_model(dataclasses.replace(named, strengths=[0.0, 5.0], max_new_tokens=2, device="cpu", **outputs_in(tmp_path)))
    assert len(table.prompts) == len(named.prompts) and all(len(answers) == 2 for answers in table.answers)
    with pytest.raises(UserError, match="trained at hook_point 'resid_post', not 'mlp_out'"):
        steer_model(SteerConfig(checkpoint=str(tiny_checkpoint), model_name=str(tiny_model_folder), features=[3], hook_point="mlp_out"))
    with pytest.raises(UserError, match="MODE must be one of add, clamp, ablate"):
        SteerConfig(mode="boost")


class _Cells(HTMLParser):
    """Table cells' text and every tag name of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.cells: list[str] = []
        self.in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("td", "th"):
            self.cells.append("")
            self.in_cell = True

    def handle_endtag(self, tag):
        self.in_cell = self.in_cell and tag not in ("td", "th")

    def handle_data(self, data):
        if self.in_cell:
            self.cells[-1] += data


def test_the_script_writes_escaped_markdown_and_html_and_alpha_zero_is_the_plain_answer(
    tiny_checkpoint, tiny_model_folder, tiny_llama, smollm2_tokenizer, tmp_path, capsys
):
    hostile = "<script>alert(1)</script> a | b, and\nnew line?"
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"messages": [{"role": "user", "content": hostile}]}, {"messages": [{"role": "user", "content": "Plan my day, please."}]}],
    )
    markdown, page = tmp_path / "steer.md", tmp_path / "steer.html"
    constants = runpy.run_path(str(SCRIPT))  # the script's constants, without running it
    argv = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--model-name",
        str(tiny_model_folder),
        "--prompts-file",
        str(prompts),
        "--features",
        "3,5",
        "--strengths",
        "0",
        "40",
        "--max-new-tokens",
        "6",
        "--markdown-path",
        str(markdown),
        "--html-path",
        str(page),
        "--device",
        "cpu",
    ]
    run_step(SteerConfig, constants, steer_model, description=constants["__doc__"], argv=argv)

    written = markdown.read_text()
    assert "| prompt | α = 0 | α = 40 |" in written and "features 3, 5 (add)" in written
    assert "; greedy, up to 6 new tokens" in written.splitlines()[0]  # how the answers were made, as a rerun overwrites them
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a \\| b, and<br>new line?" in written and "<script>" not in written
    assert len([line for line in written.splitlines() if line.startswith("| ")]) == 3  # header + one row per prompt
    assert written.split("\n\n", 1)[1].strip() in capsys.readouterr().out

    parsed = _Cells()
    parsed.feed(page.read_text())
    assert "script" not in parsed.tags and not any(tag in ("img", "link") for tag in parsed.tags)  # self-contained, nothing injected
    assert parsed.cells[:3] == ["prompt", "α = 0", "α = 40"] and parsed.cells[3] == hostile
    assert parsed.cells[6] == "Plan my day, please."

    plain = generate(
        tiny_llama,
        prompt_token_ids(smollm2_tokenizer, Example(row=0, source="", text=hostile), True),
        1,
        6,
        0.0,
        0,
        smollm2_tokenizer.pad_token_id,
    )
    assert parsed.cells[4] == smollm2_tokenizer.decode(plain[0], skip_special_tokens=True).strip()


def test_prompts_with_commas_stay_whole_and_chat_prompts_end_at_the_assistant_turn(smollm2_tokenizer):
    from fastsae.common.config import parse_step_config

    config = parse_step_config(SteerConfig, {"PROMPTS": "Hello, world"}, "", ["--features", "1,2"])
    assert config.prompts == ["Hello, world"] and config.features == [1, 2]
    config = parse_step_config(SteerConfig, {}, "", ["--prompts", "Tell me, briefly, why.", "Second"])
    assert config.prompts == ["Tell me, briefly, why.", "Second"]
    chat = smollm2_tokenizer.decode(prompt_token_ids(smollm2_tokenizer, PROMPT, use_chat_template=True))
    assert chat.endswith("<|im_start|>assistant\n") and PROMPT.text in chat
    assert (
        smollm2_tokenizer.decode(prompt_token_ids(smollm2_tokenizer, PROMPT, use_chat_template=False), skip_special_tokens=True)
        == PROMPT.text
    )


def outputs_in(folder: Path) -> dict[str, str]:
    """Where a test's steering table goes: its own folder, not the working directory."""
    return {"markdown_path": str(folder / "steering.md"), "html_path": str(folder / "steering.html")}


def test_a_prompts_file_is_read_by_its_text_field_and_its_errors_name_steerings_own_settings(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"question": "Why?"}, {"question": "How, exactly?"}])
    with pytest.raises(UserError, match=r"Set TEXT_FIELD \(or --text-field\)"):
        prompt_examples(SteerConfig(prompts_file=str(prompts)))
    assert [example.text for example in prompt_examples(SteerConfig(prompts_file=str(prompts), text_field="question"))] == [
        "Why?",
        "How, exactly?",
    ]
    with pytest.raises(UserError, match=r"Set PROMPTS_FILE \(or --prompts-file\)"):  # it named DATASET, which steering lacks
        prompt_examples(SteerConfig(prompts_file=str(tmp_path / "missing.jsonl")))


def test_an_empty_prompt_is_refused_naming_it():
    """The model answered the bare chat template, in a row whose prompt cell was blank."""
    with pytest.raises(UserError, match=r"PROMPTS\[1\] is empty: write the text the model should answer, or remove it"):
        SteerConfig(prompts=["Why?", "  "])


def test_a_feature_named_twice_is_refused():
    """Its direction would count twice in the sum."""
    with pytest.raises(UserError, match=r"FEATURES names feature 3 more than once: list each feature once"):
        SteerConfig(features=[3, 5, 3])


def test_an_output_path_that_is_a_folder_or_shared_by_both_outputs_is_refused_before_the_model_runs(tmp_path):
    """A folder failed with a traceback only after every answer was generated, the table written and the page not; one
    path for both let the page overwrite the table."""
    with pytest.raises(UserError, match=rf"HTML_PATH = {tmp_path} is a folder: set it to the path of a file"):
        SteerConfig(markdown_path=str(tmp_path / "steering.md"), html_path=str(tmp_path))
    with pytest.raises(UserError, match="MARKDOWN_PATH and HTML_PATH name the same file, .*out: one output would replace the other"):
        SteerConfig(markdown_path=str(tmp_path / "out"), html_path=str(tmp_path / "sub" / ".." / "out"))


def test_the_progress_bar_counts_each_generated_token_while_the_answer_is_written(tiny_llama, smollm2_tokenizer):
    """It advanced once per prompt: a long answer on a large model showed no progress until it was done."""
    from tqdm import tqdm

    from fastsae.tools.steer_model import TokenProgress

    ids = prompt_token_ids(smollm2_tokenizer, PROMPT, use_chat_template=True)
    with tqdm(total=14, file=io.StringIO()) as bar:
        progress = TokenProgress(bar)
        for expected in (7, 14):  # a second answer starts again at its prompt
            new_tokens = generate(tiny_llama, ids, 2, 7, 0.0, 0, smollm2_tokenizer.pad_token_id, progress)
            assert new_tokens.shape[1] == 7 and bar.n == expected


def test_steering_another_model_than_the_checkpoints_warns_naming_both(tiny_llama, smollm2_tokenizer, tiny_model_folder, tmp_path, caplog):
    """Only the width and depth were checked: a fine-tune or base model of the same shape was steered without a word."""
    config = ExtractConfig(layers=[TINY_LAYER], max_examples=48, output_dir=str(tmp_path / "store"))
    dataset = load_dataset(config.dataset, max_examples=config.max_examples)
    (store,) = write_activation_stores(tiny_llama, smollm2_tokenizer, dataset, config, "tiny", {"model_name": str(tiny_model_folder)})
    checkpoint = train_small_sae(store, tmp_path / "sae", epochs=1.0)
    moved = shutil.copytree(tiny_model_folder, tmp_path / "moved-copy")
    steering_config = SteerConfig(
        checkpoint=str(checkpoint), model_name=str(moved), prompts=["Hi"], features=[3], strengths=[5.0], max_new_tokens=1, device="cpu"
    )
    with caplog.at_level("WARNING"):
        steer_model(dataclasses.replace(steering_config, **outputs_in(tmp_path)))
    assert f"Loading model {moved}; {checkpoint} was trained on {tiny_model_folder}. They must be the same weights." in caplog.text


def test_generation_past_a_learned_position_table_is_refused_and_past_a_rotary_context_warned(smollm2_tokenizer, tiny_llama, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastsae.tools.steer_model import check_generation_room

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(smollm2_tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval()
    prompts = [[1] * 5, [1] * 20, [1] * 3]
    check_generation_room(gpt2, prompts, max_new_tokens=12)  # 20 + 12 fills the table exactly
    with pytest.raises(
        UserError,
        match=r"prompt 1 has 20 tokens, so with MAX_NEW_TOKENS = 13 .* 32 positions GPT2LMHeadModel .*set MAX_NEW_TOKENS to 12 or less",
    ):
        check_generation_room(gpt2, prompts, max_new_tokens=13)
    with pytest.raises(UserError, match=r"prompt 0 has 40 tokens.*shorten it"):
        check_generation_room(gpt2, [[1] * 40], max_new_tokens=1)

    tiny_llama.config.max_position_embeddings = 32  # rotary: a longer answer runs, at positions it was not trained on
    try:
        with caplog.at_level("WARNING", logger="fastsae.tools.steer_model"):
            check_generation_room(tiny_llama, prompts, max_new_tokens=12)
            assert not caplog.records
            check_generation_room(tiny_llama, prompts, max_new_tokens=13)
    finally:
        tiny_llama.config.max_position_embeddings = 1024
    assert "Prompt 1 has 20 tokens, so with MAX_NEW_TOKENS = 13 its answer runs past the 32 positions LlamaForCausalLM was" in caplog.text


@pytest.mark.parametrize(
    "constant, value", [("STRENGTHS", [0, "strong"]), ("FEATURES", [3.7]), ("FEATURES", [True]), ("PROMPTS", [{"role": "user"}])]
)
def test_a_list_constant_whose_items_are_not_of_its_type_is_refused_naming_it(constant, value):
    """argparse converts flags but never sees a constant's list: a string strength crashed in the table's header with a
    traceback, 3.7 steered feature 3, True indexed the decoder as a mask."""
    from fastsae.common.config import parse_step_config

    constants = runpy.run_path(str(SCRIPT))
    with pytest.raises(UserError, match=rf"{constant} must be a list of \w+, e\.g\. {constant} = \["):
        parse_step_config(SteerConfig, {**constants, constant: value}, "", [])
    converted = parse_step_config(SteerConfig, {**constants, "STRENGTHS": [0, "25"], "FEATURES": [3.0]}, "", [])
    assert converted.strengths == [0.0, 25.0] and converted.features == [3]  # as the command line converts them


@pytest.mark.parametrize("setting", [{"strengths": [0.0, float("nan")]}, {"clamp_value": float("inf")}, {"temperature": float("nan")}])
def test_a_strength_clamp_value_or_temperature_that_is_no_finite_number_is_refused(setting):
    """NaN or inf steering made every logit NaN: each answer came back empty and the table was written as if it were a result."""
    with pytest.raises(UserError, match="must be (finite numbers|0 \\(greedy\\) or positive)"):
        SteerConfig(**setting)
