"""``zoo-eval`` and its lm-evaluation-harness model, on tiny run directories laid out as ``zoo-train`` leaves them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lm_eval
import mlflow
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from arch_zoo import LanguageModel, ModelConfig
from arch_zoo.contract import ConfigError
from experiments.data.tokenizer import ByteTokenizer
from experiments.decoding_check import decoding_agreement, reduced_state_costs
from experiments.downstream.lm import ArchZooLM
from experiments.downstream.tasks import TASKS_DIR
from experiments.eval import DecodingCheckConfig, EvalConfig, run
from tests.test_state_precision import RETNET, write_run

MIXERS = {"retnet": RETNET, "transformer": {"name": "transformer", "n_heads": 4}}


def tiny(mixer: dict) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=257, d_model=32, n_layers=2, mixer=mixer, init_std=0.5)).eval()


def direct_loglikelihood(model: LanguageModel, context: str, continuation: str) -> tuple[float, bool]:
    """One unbatched forward of end-of-document + context + continuation; log-probs summed over the continuation."""
    ctx, cont = list(context.encode()) or [256], list(continuation.encode())
    tokens = torch.tensor([ctx + cont])
    logprobs = model(tokens[:, :-1])[0][0].double().log_softmax(-1)[len(ctx) - 1 :]
    target = torch.tensor(cont)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def request(kind: str, args: tuple) -> Instance:
    return Instance(kind, {}, args, 0)


@pytest.mark.parametrize("mixer", MIXERS.values(), ids=MIXERS.keys())
def test_batched_loglikelihoods_equal_the_models_own_forward(mixer):
    model = tiny(mixer)
    pairs = [("def f(x):", " return x"), ("", "import os"), ("a = 1\n", "b"), ("class A:\n    pass", "\n\n")]
    lm = ArchZooLM(model, ByteTokenizer(), batch_size=3)  # two batches, each padded on the right
    got = lm.loglikelihood([request("loglikelihood", p) for p in pairs])
    for (value, greedy), pair in zip(got, pairs):
        expected, expected_greedy = direct_loglikelihood(model, *pair)
        assert value == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    text = "def g(y):\n    return y * 2\n" * 3
    (whole,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", (text,))])
    assert whole == pytest.approx(direct_loglikelihood(model, "", text)[0], abs=1e-3)
    windowed = ArchZooLM(model, ByteTokenizer(), max_length=16).loglikelihood_rolling(
        [request("loglikelihood_rolling", (text,))]
    )
    assert windowed[0] != pytest.approx(whole, abs=1e-3)  # shorter contexts: each token is still scored once


@pytest.mark.parametrize("mixer", MIXERS.values(), ids=MIXERS.keys())
def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(mixer):
    model = tiny(mixer)
    lm = ArchZooLM(model, ByteTokenizer(), batch_size=2)
    contexts = ["def f(x):", "def g(y):", "x = [1,"]  # two share a length (one batch), one alone
    kwargs = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until([request("generate_until", (c, kwargs)) for c in contexts])
    for context, text in zip(contexts, got):
        ids = model.generate(torch.tensor([list(context.encode())]), 12)[0, len(context.encode()) :].tolist()
        continuation = bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        if 256 in ids:
            continuation = bytes(ids[: ids.index(256)]).decode("utf-8", errors="replace")
        assert text == continuation.split("\n")[0]


def test_the_local_task_runs_through_lm_eval_on_the_models_own_loglikelihoods():
    model = tiny(RETNET)
    lm = ArchZooLM(model, ByteTokenizer(), batch_size=4)
    result = lm_eval.simple_evaluate(
        model=lm, tasks=["zoo_mc"], task_manager=TaskManager(include_path=str(TASKS_DIR)), bootstrap_iters=0
    )
    samples = result["samples"]["zoo_mc"]
    assert len(samples) == 12
    correct = 0
    for sample in samples:
        scores = [direct_loglikelihood(model, *args)[0] for args in sample["arguments"]]
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(scores, abs=1e-4)
        correct += max(range(len(scores)), key=scores.__getitem__) == sample["target"]
    assert result["results"]["zoo_mc"]["acc,none"] == pytest.approx(correct / 12)
    assert get_model("arch_zoo") is ArchZooLM


def test_decoding_agreement_is_exact_in_float32_for_any_mixer():
    for mixer in MIXERS.values():
        tokens = torch.randint(257, (2, 41), generator=torch.Generator().manual_seed(0))
        result = decoding_agreement(tiny(mixer), tokens[:, :-1], tokens[:, 1:], 8)
        assert result["positions"] == 2 * 32 and result["greedy_agreement"] == 100.0
        assert result["max_logit_diff"] < 1e-4 and abs(result["rel_delta_nll"]) < 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str, str]:
    """A run directory, and the MLflow run that trained it (tagged with its output directory, as zoo-train does)."""
    tmp = tmp_path_factory.mktemp("eval")
    checkpoint = write_run(tmp, RETNET)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("tiny", artifact_location=str(tmp / "artifacts"))
    tags = {"output_dir": str(checkpoint.parent.parent), "mixer": "retnet"}
    run_id = client.create_run(experiment, run_name="retnet tiny", tags=tags).info.run_id
    return checkpoint, uri, run_id


def test_the_command_writes_a_child_run_with_perplexity_decoding_and_the_local_task(trained):
    checkpoint, uri, parent = trained
    command = [sys.executable, "-m", "experiments.eval", f"checkpoint={checkpoint.parent.parent}", "device=cpu"]
    options = [f"tracking_uri={uri}", "lengths=[32,64]", "downstream.tasks=[zoo_mc]", "decoding.sequences=2"]
    options.append("decoding.state_dtypes=[bfloat16]")
    # a misspelt setting is refused: started alongside, since it stops at the config (the CI machine has two cores)
    typo = subprocess.Popen([*command, "lenghts=[32]"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run([*command, *options], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "downstream/zoo_mc/acc" in done.stdout and f"under run {parent}" in done.stderr

    client = mlflow.MlflowClient(uri)
    (child,) = client.search_runs([client.get_run(parent).info.experiment_id], "tags.eval = 'true'")
    assert child.data.tags["mlflow.parentRunId"] == parent and child.info.status == "FINISHED"
    metrics = child.data.metrics
    for split in ("val", "val_len64"):  # block size 32 is "val", as training names it
        assert metrics[f"{split}/ppl"] == pytest.approx(2.718281828 ** metrics[f"{split}/loss"], rel=1e-5)
        assert metrics[f"{split}/bpb"] > 0
    assert metrics["decode/greedy_agreement"] == 100.0 and metrics["decode/max_logit_diff"] < 1e-4
    assert metrics["decode/state_bfloat16/max_logit_diff"] > 100 * metrics["decode/max_logit_diff"]
    assert 0 <= metrics["downstream/zoo_mc/acc"] <= 1
    assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"downstream.json"}
    typo_stderr = typo.communicate(timeout=300)[1]
    assert typo.returncode != 0 and "lenghts" in typo_stderr


def test_a_run_id_finds_its_checkpoint_and_bad_settings_are_refused(trained):
    checkpoint, uri, parent = trained
    metrics, child = run(
        EvalConfig(run_id=parent, tracking_uri=uri, device="cpu", decoding=DecodingCheckConfig(enabled=False))
    )
    assert set(metrics) == {"val/loss", "val/ppl", "val/acc", "val/bpb"}
    assert mlflow.MlflowClient(uri).get_run(child).data.tags["mlflow.parentRunId"] == parent
    with pytest.raises(ConfigError, match="must lie in 1..7"):
        run(EvalConfig(checkpoint=str(checkpoint), decoding=DecodingCheckConfig(length=8, prompt=8), log=False))
    with pytest.raises(ConfigError, match="every length must be >= 2"):
        run(EvalConfig(checkpoint=str(checkpoint), lengths=[1], log=False))
    with pytest.raises(ConfigError, match="must tokenise as the run did"):
        bpe = {"_target_": "experiments.data.datamodule.TextDataModule", "tokenizer": "bpe"}
        run(EvalConfig(checkpoint=str(checkpoint), data=bpe, log=False))


def test_the_downstream_sweep_makes_one_evaluation_per_shot_count_and_zoo_table_lays_them_out(trained, tmp_path):
    checkpoint, uri, parent = trained
    sweep = [sys.executable, "-m", "experiments.eval", "-m", "+sweep=downstream", f"checkpoint={checkpoint}"]
    offline = ["downstream.tasks=[zoo_mc]", "downstream.limit=4", f"tracking_uri={uri}", "device=cpu"]
    done = subprocess.run([*sweep, *offline], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("downstream").experiment_id])
    assert sorted(r.data.params["downstream.num_fewshot"] for r in runs) == ["0", "4"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent and "val/ppl" not in r.data.metrics for r in runs)
    table = subprocess.run(
        [str(Path(sys.executable).with_name("zoo-table")), "--experiment", "downstream", "--tracking-uri", uri],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert table.returncode == 0, table.stderr[-2000:]
    assert "| model | shots | zoo_mc |" in table.stdout and "| retnet tiny [" in table.stdout


def test_reduced_precision_states_cost_what_state_precision_measures_and_need_a_mixer_that_has_them():
    model = tiny(RETNET)
    tokens = torch.randint(257, (2, 41), generator=torch.Generator().manual_seed(0))
    costs = reduced_state_costs(model, tokens[:, :-1], tokens[:, 1:], 8, ["auto", "float16", "bfloat16"])
    assert costs["auto"]["max_logit_diff"] < costs["float16"]["max_logit_diff"] < costs["bfloat16"]["max_logit_diff"]
    assert {block.mixer.config.state_dtype for block in model.blocks} == {"auto"}  # restored
    with pytest.raises(ConfigError, match="is not one of"):
        reduced_state_costs(model, tokens[:, :-1], tokens[:, 1:], 8, ["float8"])
    with pytest.raises(ConfigError, match="no mixer of this model .* has a state_dtype setting"):
        reduced_state_costs(tiny(MIXERS["transformer"]), tokens[:, :-1], tokens[:, 1:], 8, ["float16"])
