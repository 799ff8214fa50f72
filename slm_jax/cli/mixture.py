"""slm-mixture: list and inspect the registered SeqIO tasks and mixtures."""

from __future__ import annotations

import argparse
import math
import os
import sys

from slm_jax.cli import common

DESCRIPTION = """\
List the registered SeqIO tasks and mixtures (tasks/), or inspect one: per-task example counts,
hours of audio, mixing rates, length statistics (log-mel frames, speech positions after
subsampling, instruction and target tokens) and a few decoded examples.

The corpus tasks read --corpus_dir (default: $SLM_CORPUS_DIR, else data/corpus).

examples:
  slm-mixture list
  slm-mixture inspect asr_ast_instruct --corpus_dir=data/tiny --png=mix.png
  slm-mixture inspect ast_en_fr --split=validation --wav=listen/ --num_examples=5
"""


def _register(corpus_dir: str | None) -> None:
    from slm_jax import tasks

    if corpus_dir:
        tasks.register_all(corpus_dir)


def _list(args) -> int:
    import seqio

    _register(args.corpus_dir)
    from slm_jax import tasks

    real = set(tasks.real_task_names())
    corpus_dir = tasks.corpus_tasks.registered_corpus_dir()
    print(f"corpus: {corpus_dir}")
    print("mixtures:")
    for name in sorted(seqio.MixtureRegistry.names()):
        members = [t.name for t in seqio.MixtureRegistry.get(name).tasks]
        print(f"  {name:<28s} {len(members)} tasks: {', '.join(members)}")
    print("tasks:")
    for name in sorted(seqio.TaskRegistry.names()):
        task = seqio.TaskRegistry.get(name)
        if name in real:
            kind = f"real corpus ({type(task.source).__name__})"
        else:
            from slm_jax.data.corpus import builder as corpus

            info = corpus.ALL_TASKS.get(name)
            # A task of imported recordings: its manifest describes it.
            described = info.description if info else tasks.corpus_tasks.task_description(corpus_dir, name)
            kind = described or type(task.source).__name__
        print(f"  {name:<28s} [{','.join(task.splits)}] {kind}")
    return 0


def _subsampled(frames: int, rate: int) -> int:
    return math.ceil(frames / rate)


def _percentiles(values) -> str:
    import numpy as np

    if not values:
        return "-"
    v = np.asarray(values)
    return f"{v.min():>5d} {int(np.median(v)):>5d} {int(np.percentile(v, 95)):>5d} {v.max():>5d}"


def _inspect(args) -> int:
    import seqio
    from tqdm import tqdm

    from slm_jax.data.seqio.source import corrupt_shard_error, get_provider, iterate_numpy

    _register(args.corpus_dir)
    provider = get_provider(args.name)
    tasks = list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]
    tasks = [t for t in tasks if args.split in t.splits]
    if not tasks:
        raise common.UserError(f"{args.name} has no {args.split!r} split")
    vocab = provider.output_features["targets"].vocabulary

    counts = {t.name: t.source.num_input_examples(args.split) for t in tasks}
    rates = ({t.name: provider.get_rate(t) for t in tasks} if isinstance(provider, seqio.Mixture)
             else {tasks[0].name: 1.0})
    total_rate = sum(rates.values()) or 1.0
    stats: dict[str, dict[str, list[int]]] = {}
    seconds: dict[str, float] = {}
    shown: list[tuple[str, dict]] = []
    for task in tqdm(tasks, desc="reading", unit="task", disable=args.quiet):
        ds = task.get_dataset(sequence_length=None, split=args.split, shuffle=False, num_epochs=1,
                              trim_output_features=False, try_in_mem_cache=False).take(args.max_examples)
        s = stats[task.name] = {"frames": [], "speech": [], "prompt": [], "targets": []}
        for i, ex in enumerate(iterate_numpy(ds, task.name, lambda e, t=task: corrupt_shard_error(t, e))):
            frames = int(ex["audio_features"].shape[0])
            s["frames"].append(frames)
            s["speech"].append(_subsampled(frames, args.subsample))
            s["prompt"].append(int(ex["prefix"].size + ex["suffix"].size))
            s["targets"].append(int(ex["targets"].size))
            if i < args.num_examples:
                shown.append((task.name, ex))
        hours = getattr(task.source, "seconds", None)
        seconds[task.name] = hours(args.split) if hours else sum(s["frames"]) / 100.0

    print(f"{args.name} ({args.split}): {len(tasks)} task(s), {sum(counts.values())} examples, "
          f"{sum(seconds.values()) / 3600:.3f} hours")
    print(f"{'task':<28s} {'examples':>8s} {'hours':>8s} {'rate':>7s}   "
          f"speech positions (/ {args.subsample}) min/med/p95/max   target tokens min/med/p95/max")
    for task in tasks:
        s = stats[task.name]
        print(f"{task.name:<28s} {counts[task.name]:>8d} {seconds[task.name] / 3600:>8.4f} "
              f"{rates[task.name] / total_rate:>7.3f}   {_percentiles(s['speech']):>23s}   "
              f"{_percentiles(s['targets']):>23s}")
    everything = {k: [v for s in stats.values() for v in s[k]] for k in ("frames", "prompt", "targets")}
    print(f"log-mel frames {_percentiles(everything['frames'])} | prompt tokens {_percentiles(everything['prompt'])}"
          f" | target tokens {_percentiles(everything['targets'])} (min/med/p95/max over "
          f"{len(everything['frames'])} examples read)")
    print("examples:")
    for task_name, ex in shown:
        print(f"  [{task_name}] {ex['id'].decode()}  ({ex['audio_features'].shape[0]} frames)")
        print(f"    instruction: {vocab.decode(ex['prefix'].tolist() + ex['suffix'].tolist())}")
        print(f"    target:      {vocab.decode(ex['targets'].tolist())}")
    if args.png:
        _plot(args.png, args.name, shown[0] if shown else None, stats, args.subsample)
        print(f"wrote {args.png}")
    if args.wav:
        written = _write_wavs(args.wav, tasks, args.split, args.num_examples)
        print(f"wrote {written} wav files to {args.wav}")
    return 0


def _plot(path: str, name: str, example, stats: dict, subsample: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig = plt.figure(figsize=(12, 8), constrained_layout=True)
    grid = fig.add_gridspec(2, 2)
    ax = fig.add_subplot(grid[0, :])
    if example is not None:
        task_name, ex = example
        image = ax.imshow(ex["audio_features"].T, origin="lower", aspect="auto", cmap="magma",
                          extent=[0, ex["audio_features"].shape[0] / 100.0, 0, ex["audio_features"].shape[1]])
        fig.colorbar(image, ax=ax, label="normalised log-mel")
        ax.set_title(f"{task_name} {ex['id'].decode()}: log-mel spectrogram (80 bins, 25 ms / 10 ms)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("mel bin")
    names = sorted(stats)
    for col, (key, label) in enumerate((("speech", f"speech positions after {subsample}x subsampling"),
                                        ("targets", "target tokens (with EOS)"))):
        ax = fig.add_subplot(grid[1, col])
        data = [stats[n][key] for n in names if stats[n][key]]
        labels = [n for n in names if stats[n][key]]
        if data:
            bins = np.linspace(0, max(max(d) for d in data) + 1, 30)
            colours = [plt.get_cmap("tab20")(i % 20) for i in range(len(data))]  # 11+ tasks: tab10 repeats
            ax.hist(data, bins=bins, stacked=True, label=labels, color=colours)
        ax.set_xlabel(label)
        ax.set_ylabel("examples")
        if col == 1 and len(labels) > 1:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{name}: {sum(len(stats[n]['speech']) for n in names)} examples")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _write_wavs(out_dir: str, tasks, split: str, per_task: int) -> int:
    """The first ``per_task`` clips of each task, as the front end sees them (16 kHz mono)."""
    import soundfile

    from slm_jax.data.seqio.source import corrupt_shard_error, iterate_numpy

    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for task in tasks:
        # The task's first preprocessor decodes its source into the common example (with samples).
        ds = task.preprocessors[0](task.source.get_dataset(split=split, shuffle=False)).take(per_task)
        for ex in iterate_numpy(ds, task.name, lambda e, t=task: corrupt_shard_error(t, e)):
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in ex["id"].decode())
            soundfile.write(os.path.join(out_dir, f"{name}.wav"), ex["samples"], 16000, subtype="PCM_16")
            with open(os.path.join(out_dir, f"{name}.txt"), "w", encoding="utf-8") as f:
                f.write(f"{ex['instruction'].decode()}\n{ex['target'].decode()}\n")
            written += 1
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        parser = argparse.ArgumentParser(prog="slm-mixture", description=DESCRIPTION,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        sub = parser.add_subparsers(dest="command", required=True)
        p_list = sub.add_parser("list", help="list registered tasks and mixtures")
        p_list.add_argument("--corpus_dir", default=None, help="the generated corpus the corpus tasks read")
        p = sub.add_parser("inspect", help="counts, hours, rates, lengths and examples of a task or mixture",
                           description="Counts, hours, mixing rates, length statistics and decoded examples.")
        p.add_argument("name", help="a task or mixture name (see `slm-mixture list`)")
        p.add_argument("--corpus_dir", default=None, help="the generated corpus the corpus tasks read")
        p.add_argument("--split", default="train", help="train, validation or test (default train)")
        p.add_argument("--num_examples", type=int, default=1,
                       help="decoded examples shown (and --wav clips written) per task (default 1)")
        p.add_argument("--max_examples", type=int, default=500,
                       help="examples read per task for the length statistics (default 500)")
        p.add_argument("--subsample", type=int, default=4,
                       help="log-mel frames per speech position the LLM sees (encoder stride x adapter rate; "
                            "default 4)")
        p.add_argument("--png", default=None, help="save a log-mel spectrogram and length histograms to this PNG")
        p.add_argument("--wav", default=None, help="write the first --num_examples clips of each task here")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        args = parser.parse_args(argv)
        common.setup_logging()
        if args.command == "list":
            return _list(args)
        for flag in ("num_examples", "max_examples", "subsample"):
            if getattr(args, flag) < 1:
                raise common.UserError(f"--{flag} must be positive, got {getattr(args, flag)}")
        return _inspect(args)

    return common.run_main("slm-mixture", run)


if __name__ == "__main__":
    sys.exit(main())
