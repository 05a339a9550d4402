"""First-letter feature absorption: planted absorption comes out as planted, and the whole evaluation equals SAEBench's own
(`tests/saebench_absorption_reference.py` runs sae-bench 0.6.0's `run_eval` through TransformerLens on the same model, SAE,
words and seed)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import random
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from conftest import write_tiny_gguf
from fastsae.common.errors import UserError
from fastsae.common.stage import Calibration, Corpus, PlanFacts
from fastsae.core.sae import SAESpec, SparseAutoencoder
from fastsae.core.saelens_export import saelens_weights
from fastsae.core.trained_sae import open_trained_sae
from fastsae.evaluate.absorption import (
    ABSORPTION_FILE,
    AbsorptionSettings,
    AbsorptionWork,
    absorption_result,
    absorption_table,
    run_absorption,
    sae_absorption,
    spelling_probe,
    task_vocabulary,
    write_absorption,
)
from fastsae.evaluate.absorption_metrics import (
    LinearProbes,
    k_sparse_probes,
    latent_activations,
    letter_absorption,
    main_latents,
    word_absorption,
)
from fastsae.evaluate.evaluate_sae import STAGE, EvalConfig, evaluate_sae
from fastsae.evaluate.spelling_task import LETTERS, Word, alpha_words, train_test_prompts
from fastsae.extract.extract_activations import ExtractConfig
from fastsae.train.train_sae import TrainConfig, train_saes
from saebench_absorption_reference import saebench_absorption_reference

S = LETTERS.index("s")


def planted_sae(decoder_norm: float) -> SparseAutoencoder:
    """A ReLU SAE on d=8 with a main "starts with S" latent 0 (decoder e0) and a child latent 1 whose decoder carries e0.

    Latent 0 reads e0 - 3·e1 + 2.5·e3 (silenced by the child's e1, partly restored by e3), latent 1 reads 2·e1, latent 2 reads
    e2 (decoder e2, orthogonal to the probe). Decoder rows have norm `decoder_norm` and encoder rows are divided by it: the
    same SAE, its latents in other units (as our checkpoints keep the activation scale in the decoder).
    """
    sae = SparseAutoencoder(SAESpec("relu", 8, 12, 0)).eval()
    e = torch.eye(8)
    encoder = torch.zeros(12, 8)
    decoder = torch.zeros(12, 8)
    encoder[0], decoder[0] = e[0] - 3 * e[1] + 2.5 * e[3], e[0]
    encoder[1], decoder[1] = 2 * e[1], (e[0] + e[1]) / 2**0.5
    encoder[2], decoder[2] = e[2], e[2]
    for row in range(3, 12):  # latents that never fire here
        encoder[row], decoder[row] = -e[4 + row % 4], e[4 + row % 4]
    with torch.no_grad():
        sae.W_enc.copy_(encoder / decoder_norm)
        sae.W_dec.copy_(decoder * decoder_norm)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("decoder_norm", [1.0, 5.8])
def test_planted_absorption_is_measured_as_planted(decoder_norm):
    """100 S-words, all with probe projection 2: 50 where the main latent fires alone, 30 where the child fires instead
    (full absorption, fraction 1), 20 where both fire (main carries 1 of 2, the child the rest: fraction 0.5)."""
    e = torch.eye(8)
    groups = {"main": 2 * e[0] + e[2], "full": 2 * e[0] + e[1], "partial": 2 * e[0] + e[1] + 0.8 * e[3]}
    kinds = ["main"] * 50 + ["full"] * 30 + ["partial"] * 20
    random.Random(0).shuffle(kinds)
    noise = torch.zeros(100, 8)
    noise[:, 5:] = torch.randn(100, 3, generator=torch.Generator().manual_seed(0)) * 0.1  # dimensions no latent reads
    activations = torch.stack([groups[kind] for kind in kinds]) + noise
    sae = planted_sae(decoder_norm)
    latents = latent_activations(sae, activations)
    probe_direction = 3 * e[0]  # any length: only its direction counts

    words = word_absorption(activations, latents, sae.W_dec.detach(), probe_direction, main_feature_ids=[0])
    assert words.full.tolist() == [kind == "full" for kind in kinds]
    expected = torch.tensor([{"main": 0.0, "full": 1.0, "partial": 0.5}[kind] for kind in kinds], dtype=torch.float64)
    torch.testing.assert_close(words.fraction, expected, atol=1e-6, rtol=0)
    letter = letter_absorption("s", words, num_split_features=1)
    assert letter.full_absorption_rate == pytest.approx(0.30)
    assert letter.mean_absorption_fraction == pytest.approx((30 * 1.0 + 20 * 0.5) / 100)
    assert letter.num_full_absorption == 30 and letter.num_probe_true_positives == 100


def test_a_child_too_weak_to_carry_the_probe_direction_is_no_absorption():
    """SAEBench counts absorption only when the absorbing latents carry at least 40% of the word's probe projection."""
    e = torch.eye(8)
    activations = (4 * e[0] + e[1])[None, :]  # probe projection 4; the child carries 2·0.707 = 1.41 < 40%
    sae = planted_sae(1.0)
    words = word_absorption(activations, latent_activations(sae, activations), sae.W_dec.detach(), e[0], main_feature_ids=[0])
    assert words.fraction.tolist() == [0.0] and words.full.tolist() == [False]


def test_a_letter_split_over_two_latents_has_two_main_latents():
    """Half the S-words fire latent 3, the other half latent 7: one latent finds half of them (F1 2/3), two find all."""
    generator = torch.Generator().manual_seed(0)
    letters = torch.randint(0, S, (400,), generator=generator)  # other letters
    letters[:100] = S
    latents = torch.rand(400, 10, generator=generator) * 0.1
    latents[:50, 3] += 2
    latents[50:100, 7] += 2
    ranking = torch.zeros(26, 10)
    ranking[S, 3], ranking[S, 7] = 2.0, 1.0
    probes = k_sparse_probes(LinearProbes(ranking, torch.zeros(26)), latents, letters, max_k=3)
    split, f1s = main_latents(probes[S], latents, letters == S, f1_jump_threshold=0.03)
    assert split == [3, 7]
    assert f1s[0] == pytest.approx(2 / 3, abs=0.02) and f1s[1] == 1.0
    assert main_latents(probes[S], latents, letters == S, f1_jump_threshold=0.5)[0] == [3]


def test_vocabulary_and_prompts_are_saebench_own(smollm2_tokenizer):
    from sae_bench.evals.absorption.probing import create_dataset_probe_training
    from sae_bench.evals.absorption.prompting import first_letter_formatter
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    words = alpha_words(smollm2_tokenizer)
    assert sorted(word.text for word in words) == sorted(get_alpha_tokens(smollm2_tokenizer))
    sample = words[::400]
    random.seed(7)
    train, test = create_dataset_probe_training(
        [word.text for word in sample], first_letter_formatter(), 1, "{word} has the first letter:", max_icl_examples=10
    )
    ours = train_test_prompts(sample, random.Random(7), "{word} has the first letter:", 10, 0.8)
    assert [prompt.text for prompt in ours[0]] == [prompt.base for prompt, _ in train]
    assert [prompt.text for prompt in ours[1]] == [prompt.base for prompt, _ in test]
    assert [prompt.word.letter for prompt in ours[0]] == [letter for _, letter in train]


def test_every_smollm2_word_stays_one_token_before_the_template(smollm2_tokenizer):
    words, counts = task_vocabulary(smollm2_tokenizer, AbsorptionSettings(max_words=300), "cpu")
    assert counts == {"alpha_tokens": 47078, "split_or_merged_by_template": 0, "sampled": 300}
    assert words == sorted(words, key=lambda word: word.token_id)
    with pytest.raises(UserError, match=r"only 1 alphabetic tokens that stay one token in the prompt \(47078"):
        task_vocabulary(smollm2_tokenizer, AbsorptionSettings(max_words=300, prompt_token_pos=-5), "cpu")  # -5 is " has"


def test_too_few_words_are_refused_with_the_fix_that_applies(smollm2_tokenizer, checkpoint, tmp_path):
    """A sample too small is raised; a tokenizer with few alphabetic tokens (the tiny GGUF's byte-level one: 54, one of
    them one token in the prompt) cannot be helped. Said before the core metrics run and write eval.json, not after,
    and not as 'Raise ABSORPTION_WORDS' for a vocabulary that has no more words."""
    with pytest.raises(UserError, match=r"^20 words for the spelling task.* Raise ABSORPTION_WORDS .*0: all 47078"):
        task_vocabulary(smollm2_tokenizer, AbsorptionSettings(max_words=20), "cpu")
    few_words = write_tiny_gguf(tmp_path / "byte-level.gguf")
    copy = tmp_path / "run" / Path(checkpoint).name
    copy.parent.mkdir()
    copy.write_bytes(Path(checkpoint).read_bytes())
    config = EvalConfig(checkpoint=[str(copy)], evals=["core", "absorption"], model_name=str(few_words), model_metrics=False)
    with pytest.raises(UserError, match=r"only 1 alphabetic tokens .* \(54 alphabetic in all, .* leave absorption out of EVALS"):
        evaluate_sae(config)
    assert sorted(path.name for path in copy.parent.iterdir()) == [copy.name]


def balanced_words(tokenizer, per_letter: int) -> list[Word]:
    """The first `per_letter` words of each letter: every letter in both splits, as SAEBench's code needs."""
    chosen: dict[int, list[Word]] = {}
    for word in alpha_words(tokenizer):
        if len(chosen.setdefault(word.letter, [])) < per_letter:
            chosen[word.letter].append(word)
    return sorted((word for words in chosen.values() for word in words), key=lambda word: word.token_id)


def test_absorption_equals_saebench_own_code(tiny_llama, smollm2_tokenizer):
    """The whole evaluation, ours against SAEBench's run_eval, on the tiny random Llama with a Top-K SAE whose decoder rows
    have norm 5.8 (SAEBench gets the same SAE with the norms folded into the encoder, as its loader folds them).

    Its random model spells nothing, so the gate is opened (probe F1 > 0 on 2 letters); what is compared is every number SAEBench
    reports: the probe's F1 per letter, the main latents, true positives, full absorptions, fractions and their means."""
    settings = AbsorptionSettings(max_words=0, min_GT_probe_f1=0.0, min_feats_for_eval=2)
    words = balanced_words(smollm2_tokenizer, per_letter=12)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec("topk", 64, 128, 8)).eval()
    folded = saelens_weights(sae)
    with torch.no_grad():
        sae.W_dec.mul_(5.8)
        sae.W_enc.div_(5.8)

    spelling = spelling_probe(tiny_llama, smollm2_tokenizer, 2, "resid_post", words, settings, "cpu")
    ours = absorption_result(spelling, sae_absorption(spelling, sae, "cpu"), {}, "tiny", "blocks.2.hook_resid_post", "tiny", {})
    theirs, k_sparse = saebench_absorption_reference(
        tiny_llama, smollm2_tokenizer, 2, folded, 8, [word.text for word in words], settings.random_seed, 0.0, 2
    )

    letters = {letter["first_letter"]: letter for letter in ours["letters"]}
    for row in k_sparse.to_dict("records"):
        if not letters[row["letter"]]["test_words"]:  # SAEBench scores a letter without held-out words F1 0; we leave it out
            assert letters[row["letter"]]["f1_probe"] is None and row["f1_probe"] == 0
            continue
        assert letters[row["letter"]]["f1_probe"] == pytest.approx(row["f1_probe"], abs=1e-9), row["letter"]
        assert letters[row["letter"]]["split_feats"] == row["split_feats"], row["letter"]
        f1s = [row[f"f1_sparse_sae_{k}"] for k in range(1, settings.max_k_value + 1)]
        assert letters[row["letter"]]["f1_sparse_sae"] == pytest.approx(f1s, abs=1e-9), row["letter"]
    block = ours["saebench_absorption"]
    assert block["eval_result_metrics"]["mean"] == pytest.approx(theirs["eval_result_metrics"]["mean"], rel=1e-5, abs=1e-6)
    details = {detail["first_letter"]: detail for detail in block["eval_result_details"]}
    assert list(details) == [detail["first_letter"] for detail in theirs["eval_result_details"]]
    for detail in theirs["eval_result_details"]:
        ours_detail = details[detail["first_letter"]]
        assert ours_detail.keys() == detail.keys()
        for key, value in detail.items():  # the letter is text; pytest's approx takes numbers only
            assert ours_detail[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-5, abs=1e-6)), key
    # Not a vacuous comparison: some letters have several main latents, absorbed words and full absorptions.
    assert max(detail["num_split_features"] for detail in details.values()) > 1
    assert sum(detail["mean_absorption_fraction"] > 0 for detail in details.values()) >= 2
    assert sum(detail["num_full_absorption"] for detail in details.values()) >= 1


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_store, tmp_path_factory) -> Path:
    config = TrainConfig(
        store=str(tiny_store), output_dir=str(tmp_path_factory.mktemp("absorption-runs")), m=64, k=4, batch_size=256, epochs=1.0
    )
    return Path(train_saes(config)[0]["checkpoint"])


def test_a_model_that_cannot_spell_gets_the_probe_scores_and_no_absorption_number(tiny_checkpoint, tiny_model_folder, tmp_path):
    trained = open_trained_sae(tiny_checkpoint)
    result = run_absorption(trained, "cpu", AbsorptionSettings(max_words=300), model_name=str(tiny_model_folder))
    assert result["status"] == "probe_too_weak" and result["saebench_absorption"] is None
    assert result["probe"]["letters_above_min_f1"] < 20
    assert "too weak to measure absorption" in result["statement"] and f"{result['probe']['test_accuracy']:.1%}" in result["statement"]
    assert "The probe learned from 240 words, a sample of the 47,078" in result["statement"]
    assert result["vocabulary"] == {
        "alpha_tokens": 47078,
        "split_or_merged_by_template": 0,
        "sampled": 300,
        "train_words": 240,
        "test_words": 60,
    }
    path = write_absorption(tmp_path, result)
    assert path.name == ABSORPTION_FILE and json.loads(path.read_text()) == result
    assert "too weak" in absorption_table(result) and "| a |" in absorption_table(result)


def test_evaluate_sae_runs_absorption_when_evals_names_it(tiny_checkpoint, tiny_model_folder):
    config = EvalConfig(
        checkpoint=[str(tiny_checkpoint)], evals=["absorption"], model_name=str(tiny_model_folder), absorption_words=300, device="cpu"
    )
    (results,) = evaluate_sae(config)
    written = json.loads((tiny_checkpoint.parent / ABSORPTION_FILE).read_text())
    assert results["absorption"] == written and written["status"] == "probe_too_weak"
    assert written["checkpoint"] == str(tiny_checkpoint)  # which SAE it is about, read later on its own
    assert written["vocabulary"]["sampled"] == 300 and not (tiny_checkpoint.parent / "eval.json").exists()
    stage_outputs = [output.path.name for output in STAGE.outputs(config, None)]
    assert stage_outputs == [ABSORPTION_FILE]
    with pytest.raises(UserError, match="ABSORPTION_WORDS must be"):
        EvalConfig(evals=["absorption"], absorption_words=-2)


def without_run_stamps(result: dict) -> dict:
    """absorption.json less what differs between any two runs: the time taken, and SAEBench's run id and date."""
    stamped = {key: value for key, value in result.items() if key != "seconds"}
    if stamped["saebench_absorption"]:
        block = stamped["saebench_absorption"]
        stamped["saebench_absorption"] = {key: value for key, value in block.items() if key not in ("eval_id", "datetime_epoch_millis")}
    return stamped


def test_a_sweep_runs_the_spelling_pass_once_and_writes_what_each_sae_alone_writes(tiny_store, tiny_model_folder, tmp_path, monkeypatch):
    training = TrainConfig(
        store=str(tiny_store), output_dir=str(tmp_path / "runs"), sweep=["topk:64:4", "topk:32:4"], batch_size=256, epochs=1.0
    )
    checkpoints = [result["checkpoint"] for result in train_saes(training)]
    # The random model cannot spell: a gate that any letter passes lets phase 2 run on the shared probe too.
    open_gate = functools.partial(AbsorptionSettings, min_GT_probe_f1=0.0, min_feats_for_eval=2)
    monkeypatch.setattr("fastsae.evaluate.evaluate_sae.AbsorptionSettings", open_gate)
    calls = []

    def counted_spelling_probe(*args, **kwargs):
        calls.append(args[2:4])  # layer, hook point
        return spelling_probe(*args, **kwargs)

    monkeypatch.setattr("fastsae.evaluate.absorption.spelling_probe", counted_spelling_probe)
    settings = dict(evals=["absorption"], model_name=str(tiny_model_folder), absorption_words=300, device="cpu")

    swept = [result["absorption"] for result in evaluate_sae(EvalConfig(checkpoint=checkpoints, **settings))]
    assert calls == [(2, "resid_post")]
    written = [json.loads((Path(checkpoint).parent / ABSORPTION_FILE).read_text()) for checkpoint in checkpoints]
    assert written == swept
    alone = [evaluate_sae(EvalConfig(checkpoint=[checkpoint], **settings))[0]["absorption"] for checkpoint in checkpoints]
    assert len(calls) == 3
    assert [without_run_stamps(result) for result in written] == [without_run_stamps(result) for result in alone]
    # Not a vacuous comparison: both SAEs were measured, each with latents of its own.
    assert [result["status"] for result in written] == ["measured", "measured"]
    assert written[0]["letters"] != written[1]["letters"]


def plan_facts() -> PlanFacts:
    """What the runner knows when it plans: SmolLM2's sizes, 330 examples of 48 tokens, speeds like this CPU's."""
    lengths = np.full(330, 48)
    calibration = Calibration(
        load_seconds=3.0, cut_tokens_per_second=1500.0, full_tokens_per_second=500.0, encode_tokens_per_second=3e5, sae_step_seconds=0.01
    )
    configs = {"extract": ExtractConfig(layers=[12]), "train": TrainConfig()}
    return PlanFacts("SmolLM2", configs, d=576, n_layers=30, vocab_size=49152, corpus=Corpus(lengths, lengths, []), calibration=calibration)


def test_the_plan_counts_absorption_once_per_sweep_and_by_its_words():
    facts = plan_facts()

    def estimate(evals: list[str], words: int = -1, checkpoints: int = 1):
        config = EvalConfig(
            checkpoint=[f"SAE_{index}.pt" for index in range(checkpoints)], evals=evals, absorption_words=words, device="cpu"
        )
        return STAGE.estimate(config, facts)

    core, with_absorption = estimate(["core"]), estimate(["core", "absorption"])
    assert with_absorption.seconds > core.seconds and "absorption: 1,000 words" in with_absorption.note
    # The model's forwards over the prompts (the bulk of it on a CPU) grow with ABSORPTION_WORDS ...
    seconds = [estimate(["absorption"], words).seconds for words in (500, 1000, 3000)]
    forwards = AbsorptionWork(1000, AbsorptionSettings()).prompt_tokens / facts.calibration.cut_tokens_per_second
    assert seconds == sorted(seconds) and seconds[2] - seconds[1] > 2 * forwards
    assert "49,152 words" in estimate(["absorption"], 0).note  # every word: at most the vocabulary
    # ... and are counted once for a sweep: a second SAE adds only its own probes.
    assert 0 < estimate(["absorption"], checkpoints=2).seconds - estimate(["absorption"]).seconds < forwards


def test_the_result_validates_against_saebench_schema(tiny_checkpoint, tiny_model_folder):
    from pydantic import TypeAdapter
    from sae_bench.evals.absorption.eval_output import AbsorptionEvalOutput

    trained = open_trained_sae(tiny_checkpoint)
    settings = AbsorptionSettings(max_words=300, min_GT_probe_f1=0.0, min_feats_for_eval=2)
    result = run_absorption(trained, "cpu", settings, model_name=str(tiny_model_folder))
    assert result["status"] == "measured"
    block = json.loads(json.dumps(result["saebench_absorption"]))
    schema = importlib.resources.files("sae_bench.evals.absorption") / "eval_output_schema_absorption_first_letter.json"
    jsonschema.validate(block, json.loads(schema.read_text()))
    parsed = TypeAdapter(AbsorptionEvalOutput).validate_python(block)
    assert parsed.eval_result_metrics.mean.mean_full_absorption_score == block["eval_result_metrics"]["mean"]["mean_full_absorption_score"]
    assert "mean_absorption_fraction_score" in absorption_table(result)


def test_a_lora_store_sae_is_refused(tiny_checkpoint):
    trained = open_trained_sae(tiny_checkpoint)
    lora = dataclasses.replace(trained, info=dataclasses.replace(trained.info, hook_point="lora", layer=None))
    with pytest.raises(UserError, match="residual-stream-like hook"):
        run_absorption(lora, "cpu", AbsorptionSettings())


def test_a_position_that_misses_the_word_is_a_user_error(tiny_llama, smollm2_tokenizer):
    words = balanced_words(smollm2_tokenizer, per_letter=3)
    with pytest.raises(UserError, match="PROMPT_TOKEN_POS=-5 does not point at the word"):
        spelling_probe(tiny_llama, smollm2_tokenizer, 2, "resid_post", words, AbsorptionSettings(prompt_token_pos=-5), "cpu")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt_template": "spell it:"}, "PROMPT_TEMPLATE"),
        ({"prompt_token_pos": 0}, "PROMPT_TOKEN_POS"),
        ({"min_feats_for_eval": 1}, "MIN_FEATS"),
    ],
)
def test_settings_are_checked(change, message):
    with pytest.raises(UserError, match=message):
        AbsorptionSettings(**change)


def test_the_vocabulary_is_sampled_on_a_cpu_only_by_default():
    assert AbsorptionSettings().words_for("cuda:0") == 0 and AbsorptionSettings().words_for("cpu") == 1000
    assert AbsorptionSettings(max_words=0).words_for("cpu") == 0
