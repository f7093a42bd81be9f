"""The command line generated from the config dataclasses (sept.config_cli): its defaults are the
configs' defaults, its flags are the ones sept has always had, and bad values fail as argparse does."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from sept.cli import build_parser, main
from sept.config_cli import add_config_arguments, config_from_args, config_overrides
from sept.training.job_shape import JobShape

# Every flag of every subcommand before the command line was generated from the configs: none may go.
FLAGS = {
    "bootstrap": "--config --out --pool --sample-size --seed --steps --target",
    "curate": "--clusters --copy-timeout-s --embeddings --gpu --niter --no-dedup --no-gpu --out --ray-address "
    "--resampling-steps --sample-size --sampling --seed --size --train-size",
    "dedup": "--bucket-rows --cluster-size --clusters --embeddings --gpu --max-attempts --no-gpu --ray-address --seed "
    "--task-timeout-s --threshold --train-size",
    "demo": "--corpus-only --executor --ray-address --workdir",
    "encoder-check": "--batch-size --device --encoder --json --k --strict --target",
    "embed": "--batch-size --decode-threads --encoder --max-bad-fraction --max-pixels --num-gpus-per-worker --out "
    "--pool --ray-address --threads-per-worker --workers",
    "evaluate": "--encoder --finetune --target",
    "experiment": "--arms --batch-size --bootstrap-steps --budget-fraction --encoder --executor --method --out --pool "
    "--preset --pretrain-config --pretrain-steps --ray-address --seeds --target --truth --truth-label",
    "import-encoder": "--arch --center-pool --center-samples --image-size --key-map --mean --out --std --strip-prefix --weights",
    "index": "--add --allow-partial --embeddings --factory --index --k --memory-budget --metric --nprobe "
    "--nprobe-sweep --out --queries --ray-address --shards --target-recall --train-size",
    "plan": "--budget-fraction --calibrate --dim --epochs --gpus --images --json --memory-per-node --nodes --profile "
    "--queries",
    "pretrain": "--account --batch-size --config --constraint --data --executor --finetune --gpus-per-node --lr "
    "--method --nodes --num-workers --out --partition --preset --qos --steps --target --task --tasks-per-node --time",
    "report": "--domain --out --samples --seed --selection --task --top --truth",
    "select": "--balance --budget --clusters --encoder --index --leakage-threshold --memory-per-searcher "
    "--min-similarity --near-dup-threshold --no-dedup --no-leakage-guard --out --query-batch --ray-address --searchers --seed "
    "--strategy --target --task --tasks --topk-share",
}
JOB_FLAGS = "--nodes --gpus-per-node --tasks-per-node --cpus-per-task --mem-gb --time --partition --account --qos"


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p.populated() for name, p in action.choices.items()}


def test_no_flag_is_lost():
    parsers = subparsers()
    assert set(parsers) == set(FLAGS)
    for name, flags in FLAGS.items():
        have = {s for a in parsers[name]._actions for s in a.option_strings}
        assert set(flags.split()) <= have, (name, sorted(set(flags.split()) - have))
    for name in ("pretrain", "experiment", "demo"):  # every command that launches submitit jobs takes a JobShape
        have = {s for a in parsers[name]._actions for s in a.option_strings}
        assert set(JOB_FLAGS.split()) <= have, name


def test_every_help_renders():
    for name, p in subparsers().items():
        assert "usage: sept " + name in p.format_help()


def test_experiment_defaults_are_the_configs():
    from sept.experiment import ExperimentConfig

    args = parse("experiment", "--pool", "P", "--target", "T", "--out", "O")
    assert config_from_args(ExperimentConfig, args) == ExperimentConfig(pool="P", target="T", out="O")
    assert config_from_args(JobShape, args) == JobShape()


def test_embed_defaults_are_the_configs():
    from sept.cluster.embed import EmbedConfig

    args = parse("embed", "--pool", "P", "--encoder", "E", "--out", "O")
    assert config_from_args(EmbedConfig, args) == EmbedConfig(pool="P", encoder="E", out="O")


def test_index_defaults_are_the_configs():
    from sept.cluster.index_build import IndexConfig
    from sept.index.eval import EvalConfig
    from sept.index.spec import IndexSpec

    args = parse("index", "--embeddings", "E", "--out", "O")
    assert args.action == "build"
    spec = config_from_args(IndexSpec, args)
    assert spec == IndexSpec()
    assert config_from_args(IndexConfig, args, spec=spec) == IndexConfig(embeddings="E", out="O")
    args = parse("index", "eval", "--index", "I", "--embeddings", "E")
    assert config_from_args(EvalConfig, args, out=args.out or "") == EvalConfig(index="I", embeddings="E")
    assert parse("index", "eval", "--index", "I", "--embeddings", "E", "--nprobe-sweep", "1, 4,16").nprobes == [
        1,
        4,
        16,
    ]


def test_select_defaults_are_the_configs():
    from sept.cluster.select_config import SelectConfig

    args = parse("select", "--index", "I", "--encoder", "E", "--out", "O")
    assert config_from_args(SelectConfig, args) == SelectConfig(index="I", encoder="E", out="O")
    args = parse("select", "--index", "I", "--encoder", "E", "--out", "O", "--target", "a", "--target", "b")
    assert args.target == ["a", "b"]


def test_report_defaults_are_the_configs():
    from sept.data.report import ReportConfig

    args = parse("report", "--selection", "S", "--out", "O")
    assert config_from_args(ReportConfig, args) == ReportConfig(selection="S", out="O")


def test_plan_defaults_are_the_configs():
    from sept.cluster.plan import PlanInputs

    args = parse("plan", "--images", "1000", "--gpus", "2")
    assert config_from_args(PlanInputs, args) == PlanInputs(images=1000, devices=2)
    assert parse("plan", "--calibrate").images is None  # images and GPUs may wait for calibration


def test_pretrain_flags_override_only_what_is_given():
    from sept.training.config import PretrainConfig

    args = parse("pretrain", "--data", "D", "--out", "O")
    assert config_overrides(PretrainConfig, args) == {"data": "D", "out": "O"}  # the rest: --config's, or defaults
    assert config_from_args(JobShape, args) == JobShape()
    args = parse("pretrain", "--data", "D", "--out", "O", "--steps", "5", "--lr", "0.1", "--time", "7")
    assert config_overrides(PretrainConfig, args) == {"data": "D", "out": "O", "steps": 5, "lr": 0.1}
    assert config_from_args(JobShape, args) == JobShape(time_min=7)


def test_demo_job_shape():
    args = parse("demo", "--executor", "slurm", "--partition", "debug", "--nodes", "2")
    assert config_from_args(JobShape, args) == JobShape(partition="debug", nodes=2)


def test_method_and_preset_choices_agree_with_the_training_config():
    from sept.experiment import ExperimentConfig
    from sept.training.config import _METHOD_ALIASES, PRESETS, PretrainConfig
    from sept.training.methods import METHODS

    def meta(cls, name):
        return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)

    names = set(METHODS) | set(_METHOD_ALIASES)
    assert set(meta(PretrainConfig, "method")["choices"]) == names
    assert set(meta(ExperimentConfig, "method")["choices"]) == names
    assert set(meta(ExperimentConfig, "preset")["choices"]) == set(PRESETS)


def test_a_bool_field_gets_its_no_form():
    base = ("select", "--index", "I", "--encoder", "E", "--out", "O")
    assert parse(*base).leakage_guard is True
    assert parse(*base, "--no-leakage-guard").leakage_guard is False
    assert parse(*base, "--no-leakage-guard", "--leakage-guard").leakage_guard is True
    base = ("index", "--embeddings", "E", "--out", "O")
    assert parse(*base).add is False
    assert parse(*base, "--add").add is True
    assert parse(*base, "--add", "--no-add").add is False


@pytest.mark.parametrize(
    "argv",
    [
        ["select", "--index", "I", "--encoder", "E", "--out", "O", "--budget", "many"],
        ["select", "--index", "I", "--encoder", "E", "--out", "O", "--strategy", "best"],
        ["select", "--index", "I", "--encoder", "E"],  # --out is required
        ["index", "eval", "--index", "I", "--embeddings", "E", "--nprobe-sweep", "1,two"],
        ["experiment", "--pool", "P", "--target", "T", "--out", "O", "--arms", "selected", "best"],
        ["pretrain", "--data", "D", "--out", "O", "--nodes", "two"],
        ["plan", "--epochs", "ten"],
    ],
)
def test_a_bad_value_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"sept {argv[0]}: error: " in capsys.readouterr().err


def test_help_imports_no_stage():
    """`sept --help` and parsing build only the command's own options: no torch, ray or faiss for the rest."""
    code = (
        "import sys; from sept.cli import build_parser; p = build_parser(); p.format_help(); "
        "p.parse_args(['report', '--selection', 'S', '--out', 'O']); "
        "print(sorted(m for m in ('torch', 'ray', 'faiss') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@dataclasses.dataclass
class _Toy:
    name: str = dataclasses.field(metadata={"help": "a name"})
    size: int = dataclasses.field(default=3, metadata={"help": "a size"})
    ratio: float | None = dataclasses.field(default=None, metadata={"help": "a ratio"})
    on: bool = dataclasses.field(default=True, metadata={"help": "switch"})
    tags: list[str] = dataclasses.field(default_factory=list, metadata={"help": "a tag, repeatable"})
    values: list[float] = dataclasses.field(default_factory=lambda: [1.0], metadata={"nargs": "+", "help": "values"})
    ids: list[int] = dataclasses.field(default_factory=list, metadata={"sep": ",", "flag": "--id-list", "help": "ids"})
    hidden: int = 7  # no help: not on the command line


def test_the_helper_on_a_toy_config():
    p = argparse.ArgumentParser()
    assert add_config_arguments(p, _Toy, skip=("ratio",)) == ["name", "size", "on", "tags", "values", "ids"]
    assert config_from_args(_Toy, p.parse_args(["--name", "n"])) == _Toy(name="n")
    args = p.parse_args(
        [
            "--name",
            "n",
            "--size",
            "4",
            "--no-on",
            "--tags",
            "a",
            "--tags",
            "b",
            "--values",
            "2",
            "3",
            "--id-list",
            "5,6",
        ]
    )
    assert config_from_args(_Toy, args) == _Toy("n", 4, None, False, ["a", "b"], [2.0, 3.0], [5, 6])
    assert "a size (default: 3)" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args([])  # --name has no default: required
    p = argparse.ArgumentParser()
    add_config_arguments(p, _Toy, override=True, skip=("name",))
    assert config_overrides(_Toy, p.parse_args(["--size", "5"])) == {"size": 5}
    assert "(default: the config file's, else 3)" in p.format_help()
