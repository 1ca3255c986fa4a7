"""What the corpus pipeline costs: peak memory and tokens/s of tokenising a generated corpus, and the start-up of a
run on the cached corpus, for the streamed token files and for the in-memory packing of an earlier commit.

    python -m experiments.bench.corpus --gb 1 --baseline-gb 0.25 --baseline-ref 0f7241a

Each measurement runs in a fresh process (its peak RSS is the process's own, plus its tokenising processes'); the
earlier pipeline is that commit's ``experiments`` package, extracted with ``git archive``, run on the same files.
The corpus (deterministic, Zipf-distributed pseudo-words in sentences and paragraphs, 1 MiB files) and every cache
are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

FILE_BYTES = 1 << 20
FILES_PER_PART = 128  # 128 MiB per folder: a baseline runs on a whole number of folders


def generate(folder: Path, n_bytes: int, seed: int = 0) -> None:
    """``n_bytes`` of text in 1 MiB files under ``folder/part<k>/``: a 20,000-word Zipf vocabulary, sentences of
    5-30 words, paragraphs of 2-8 sentences (text whose byte and word statistics resemble prose)."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)
    weights = 1.0 / np.arange(1, 27)
    lengths = np.clip(rng.poisson(4.5, 20000), 1, 14)
    vocab = np.array([bytes(rng.choice(letters, n, p=weights / weights.sum())).decode() for n in lengths], dtype=object)
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    zipf /= zipf.sum()
    for i in range(-(-n_bytes // FILE_BYTES)):
        path = folder / f"part{i // FILES_PER_PART}" / f"doc{i:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        words = vocab[rng.choice(len(vocab), FILE_BYTES // 5, p=zipf)]
        cuts = np.cumsum(rng.integers(5, 31, len(words) // 5))
        sentences = [" ".join(s).capitalize() + "." for s in np.split(words, cuts[cuts < len(words)])]
        breaks = np.cumsum(rng.integers(2, 9, len(sentences) // 2))
        text = "\n\n".join(
            " ".join(p) for p in np.split(np.array(sentences, dtype=object), breaks[breaks < len(sentences)])
        )
        path.write_text(text.encode()[:FILE_BYTES].decode(errors="ignore") + "\n")


def peak_rss_mb() -> float:
    """The largest resident set of this process and of any process it waited for (ru_maxrss is in KiB on Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def child(args: argparse.Namespace) -> None:
    """One start of a data module in this process: prints what it took as JSON."""
    from experiments.data.corpus import CorpusConfig
    from experiments.data.datamodule import DataConfig, TextDataModule

    extra = {"tokenize_num_proc": args.child_num_proc} if args.child_num_proc else {}
    corpus = CorpusConfig(source="files", files=args.files)
    config = DataConfig(corpus=corpus, cache_dir=args.cache, tokenizer=args.tokenizer, **extra)
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    data = TextDataModule(config)
    data.prepare_data()
    seconds = time.perf_counter() - started
    tokens = sum(len(s.tokens) for s in data.splits.values())
    print(
        json.dumps({"seconds": seconds, "tokens": tokens, "rss_imports_mb": rss_before, "peak_rss_mb": peak_rss_mb()})
    )


def run_child(files: list[str], cache: Path, num_proc: int | None, pythonpath: Path | None, tokenizer: str) -> dict:
    command = [sys.executable, "-m", "experiments.bench.corpus", "--child", "--cache", str(cache), "--files", *files]
    command += ["--tokenizer", tokenizer] + (["--child-num-proc", str(num_proc)] if num_proc else [])
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    if pythonpath is not None:  # the earlier commit's package; this file, which it lacks, run by its path
        env["PYTHONPATH"] = str(pythonpath)
        command[1:3] = ["-c", f"import runpy; runpy.run_path({str(Path(__file__))!r}, run_name='__main__')"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=pythonpath or Path.cwd())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(
    label: str,
    files: list[str],
    n_bytes: int,
    cache: Path,
    num_proc: int | None,
    code: Path | None = None,
    tokenizer: str = "bytes",
) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    if tokenizer == "bpe":  # train the BPE first, so that the cold start times tokenising alone
        run_child(files, cache, num_proc, code, tokenizer)
        shutil.rmtree(cache / "packed")
    cold = run_child(files, cache, num_proc, code, tokenizer)
    warm = run_child(files, cache, num_proc, code, tokenizer)
    shutil.rmtree(cache, ignore_errors=True)
    row = {
        "pipeline": label,
        "tokeniser": tokenizer if tokenizer == "bytes" else "BPE 4096",
        "corpus": f"{n_bytes / 2**30:.2f} GiB",
        "tokens": cold["tokens"],
        "tokenise s": round(cold["seconds"], 1),
        "tokens/s": f"{cold['tokens'] / cold['seconds'] / 1e6:.2f} M",
        "peak RSS MiB": round(cold["peak_rss_mb"]),
        "RSS after imports MiB": round(cold["rss_imports_mb"]),
        "cached start s": round(warm["seconds"], 3),
        "cached start peak RSS MiB": round(warm["peak_rss_mb"]),
    }
    print(json.dumps(row), flush=True)
    return row


def extract(ref: str, into: Path) -> Path:
    """The ``experiments`` and ``arch_zoo`` packages of commit ``ref``."""
    root = Path(__file__).resolve().parents[2]
    archive = subprocess.run(
        ["git", "archive", ref, "experiments", "arch_zoo"], cwd=root, capture_output=True, check=True
    )
    into.mkdir(parents=True, exist_ok=True)
    tar = into / "code.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))  # our own commit
    return into


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{models[0] if models else cpu}, nproc {os.cpu_count()}, {mem:.0f} GiB RAM, Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GiB of text for the streamed pipeline")
    parser.add_argument("--baseline-gb", type=float, default=0.25, help="GiB for the earlier in-memory pipeline")
    parser.add_argument("--baseline-ref", default="0f7241a", help="the commit whose pipeline is the baseline")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="tokenising processes to measure")
    parser.add_argument("--bpe-files", type=int, default=40, help="1 MiB files tokenised with a BPE (0: none)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "arch_zoo_corpus_bench")
    parser.add_argument("--doc", type=Path, default=None, help="also write the table, command and machine here")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--child-num-proc", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default="bytes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    free = shutil.disk_usage(args.out.parent).free / 2**30
    needed = args.gb * 4  # the text, and its tokens at two bytes each, plus room
    if free < needed:
        raise SystemExit(f"{args.out.parent} has {free:.1f} GiB free; this needs about {needed:.1f} GiB")
    corpus = args.out / "corpus"
    try:
        started = time.perf_counter()
        generate(corpus, int(args.gb * 2**30))
        print(f"generated {args.gb} GiB in {time.perf_counter() - started:.0f} s", flush=True)
        parts = sorted(p.name for p in corpus.iterdir())

        def first(gb: float) -> tuple[list[str], int]:
            """Globs of the folders that hold the first ``gb`` GiB, and their bytes."""
            chosen = parts[: max(1, round(gb * 2**30 / (FILES_PER_PART * FILE_BYTES)))]
            return [str(corpus / p / "*.txt") for p in chosen], sum(
                f.stat().st_size for p in chosen for f in (corpus / p).iterdir()
            )

        old_code = extract(args.baseline_ref, args.out / "baseline_code")
        cache = args.out / "cache"
        base, everything = first(args.baseline_gb), first(args.gb)
        rows = [measure(f"in memory ({args.baseline_ref})", *base, cache, None, old_code)]
        rows.append(measure("streamed, 1 process", *base, cache, 1))
        rows += [measure(f"streamed, {n} process(es)", *everything, cache, n) for n in args.num_proc]
        if args.bpe_files > 0:  # a BPE is ~100x slower than bytes: a smaller share of the corpus
            chosen = sorted((corpus / parts[0]).iterdir())[: args.bpe_files]
            bpe = [str(f) for f in chosen], sum(f.stat().st_size for f in chosen)
            rows.append(measure(f"in memory ({args.baseline_ref})", *bpe, cache, None, old_code, tokenizer="bpe"))
            rows += [measure(f"streamed, {n} process(es)", *bpe, cache, n, tokenizer="bpe") for n in args.num_proc]
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
    command = "python -m experiments.bench.corpus " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(rows)
    print(text)
    if args.doc is not None:
        args.doc.write_text(report(text, command))


def report(text: str, command: str) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "# The corpus pipeline: memory, tokenising speed, cached start-up\n\n"
        f"Command: `{command}`  \nMachine: {machine()}  \nDate: {when}\n\n"
        "Every row is a fresh process on the same generated files (`source=files`, byte tokeniser, one document per "
        "1 MiB file). *tokenise s* is the first start (read, tokenise, hash, write the cache); *cached start s* is "
        "a second start on the built cache, without imports; peak RSS includes the imports (torch, Lightning, "
        "datasets), shown apart.\n\n" + text + "\n"
    )


if __name__ == "__main__":
    main()
