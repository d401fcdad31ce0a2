"""Scaling out: packed-cache load time, memory of N processes, and images/s for one process,
the CLI over a folder, and Ray Data with 1 and 2 actors (same machine, same total threads).

    python bench/scale.py                      # writes bench/scale-results.md
    python bench/scale.py --images 320 --size 224 --threads 2 --skip-ray

Everything runs on random weights written to a temporary Keras .h5 file (VGG16, with the top,
528 MB), so nothing is downloaded. Each load figure comes from a fresh subprocess (warm page
cache): "off" loads the .h5 and packs the weights, "cold" does that and writes the cache file,
"warm" maps the cache file. Memory: N processes load the same model from the warm cache and
predict one 224x224 image (which touches every weight page); the table gives the sum of their
proportional set sizes (Pss, /proc/PID/smaps_rollup) against one process's.

Sharing the machine: one busy VGG16 process alone and two at once, with fastvgg's default
(waiting OpenMP threads sleep) and with libgomp's spinning waits.

Throughput: VGG16 without the top at --size, block5_pool averaged, --images generated PNGs.
"one process" is model.predict over images decoded and preprocessed beforehand (the upper
bound), and fastvgg.ray.Extractor called in the process on batches of --batch decoded images (the
actors' work without Ray: preprocessing, prediction, pooling); "CLI" is
``fastvgg features DIR`` end to end (start, load, decode, predict, write); Ray Data runs
``fastvgg.ray.Extractor`` on a dataset read and materialised first (so the read tasks do not
compete with the actors for the CPUs), with 1 actor of --threads CPUs and with --threads
actors of 1 CPU each. Each Ray row gives the whole job (actor processes started by Ray
included) and the steady state: images from the first actor's model being ready to the last
batch's end. The pipelines are timed in --rounds rounds, each timing every one of them once back
to back, and each ratio to one process is taken within a round (this VM's speed drifts by 10-20%
over minutes). Actor start-up: the Extractor's construction inside a fresh actor (model load
from the warm cache), Ray's actor creation to ready on top of it, and that of an empty actor of
the same CPUs (Ray's own floor).

    python bench/scale.py --throughput-only --rounds 3     # the throughput table alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LOAD_SAMPLES = 3


def write_weights(path: str) -> None:
    """Random VGG16 weights in Keras's classic .h5 layout (what save_weights writes)."""
    import h5py

    import fastvgg

    model = fastvgg.VGG16(None, seed=0, packed_cache=False)
    with h5py.File(path, "w") as f:
        names = [layer.name for layer in model.layers]
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        for layer in model.layers:
            group = f.create_group(layer.name)
            arrays = layer.get_weights()
            weight_names = [f"{layer.name}/{kind}:0" for kind in ("kernel", "bias")][: len(arrays)]
            group.attrs["weight_names"] = np.array([n.encode() for n in weight_names])
            for name, array in zip(weight_names, arrays):
                group.create_dataset(name, data=array)


CHILD = r"""
import json, os, sys, time
started = time.perf_counter()
import numpy as np, fastvgg
imported = time.perf_counter()
cache = sys.argv[2]
model = fastvgg.VGG16(sys.argv[1], packed_cache=False if cache == "off" else cache)
loaded = time.perf_counter()
model.predict(np.zeros((1, 224, 224, 3), np.float32))
ready = time.perf_counter()
rollup = {}
with open("/proc/self/smaps_rollup") as f:
    for line in f:
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith(":"):
            rollup[parts[0][:-1]] = int(parts[1])
print(json.dumps({"status": model._packed_cache_status, "import_s": imported - started, "load_s": loaded - imported,
                  "first_predict_s": ready - loaded, "pss_mb": rollup.get("Pss", 0) / 1024,
                  "rss_mb": rollup.get("Rss", 0) / 1024}), flush=True)
if len(sys.argv) > 3:
    sys.stdin.readline()   # hold the memory until the parent has read every process's figures
"""


def child_env(threads: int) -> dict:
    return {**os.environ, "FASTVGG_NUM_THREADS": str(threads)}


def run_child(weights: str, cache: str, threads: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, weights, cache], capture_output=True, text=True,
                          env=child_env(threads), timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_times(weights: str, cache_dir: str, threads: int, lines) -> None:
    rows = {"off": [run_child(weights, "off", threads) for _ in range(LOAD_SAMPLES)],
            "cold": [run_child(weights, cache_dir, threads)],
            "warm": [run_child(weights, cache_dir, threads) for _ in range(LOAD_SAMPLES)]}
    assert rows["cold"][0]["status"] == "built" and all(r["status"] == "hit" for r in rows["warm"]), rows
    lines += ["### Load (VGG16 with the top, fresh process, warm page cache)", "",
              f"Median of {LOAD_SAMPLES} processes (cold: one).", "",
              "| packed cache | import s | load s | first predict s | Pss MB |", "|---|---|---|---|---|"]
    for kind, samples in rows.items():
        med = {k: statistics.median(r[k] for r in samples) for k in ("import_s", "load_s", "first_predict_s", "pss_mb")}
        lines.append(f"| {kind} | {med['import_s']:.2f} | {med['load_s']:.3f} | {med['first_predict_s']:.2f} | "
                     f"{med['pss_mb']:.0f} |")
        print(lines[-1], flush=True)
    lines.append("")


def memory_of_n(weights: str, cache_dir: str, counts, lines) -> None:
    lines += ["### Memory of N processes (VGG16 with the top, 1 thread each, after one 224x224 prediction)", "",
              "| packed cache | N | sum of Pss MB | one process's Pss MB | ratio |", "|---|---|---|---|---|"]
    for cache in (cache_dir, "off"):
        single = None
        for n in counts:
            if cache == "off" and n > 2:
                continue
            processes = [subprocess.Popen([sys.executable, "-c", CHILD, weights, cache, "hold"], text=True,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env(1))
                         for _ in range(n)]
            try:
                for p in processes:
                    json.loads(p.stdout.readline())  # loaded and predicted
                # Read once all N hold the model: a page's Pss is divided among its sharers now.
                total = sum(rollup_kb(p.pid)["Pss"] for p in processes) / 1024
            finally:
                for p in processes:
                    p.communicate("\n", timeout=120)
            single = single or total
            label = "warm" if cache != "off" else "off"
            lines.append(f"| {label} | {n} | {total:.0f} | {single:.0f} | {total / single:.2f}x |")
            print(lines[-1], flush=True)
    lines.append("")


BUSY_CHILD = r"""
import sys, time
import numpy as np
import fastvgg
model = fastvgg.VGG16(None, include_top=False, seed=0, packed_cache=False)
x = np.random.default_rng(0).uniform(-120, 150, (1, 224, 224, 3)).astype(np.float32)
model.predict(x)
seconds, started = [], time.perf_counter()
while time.perf_counter() - started < float(sys.argv[1]):
    began = time.perf_counter()
    model.predict(x)
    seconds.append(time.perf_counter() - began)
print(sorted(seconds)[len(seconds) // 2] * 1e3)
"""


def contention(threads: int, lines) -> None:
    """VGG16 (no top, batch 1) alone and with a second busy process, each of `threads` threads,
    with fastvgg's default (waiting threads sleep) and with libgomp's spinning waits."""
    lines += ["### Sharing the machine (VGG16 without the top, 224x224, batch 1, median ms/image)", "",
              f"Each process runs {threads} threads for 12 s; 'two at once' starts two such processes together "
              "(the machine's cores shared by both: the fair figure is twice the one alone).", "",
              "| waiting threads | alone | two at once (each) |", "|---|---|---|"]
    for label, policy in (("sleep (fastvgg's default)", None), ("spin (OMP_WAIT_POLICY=active)", "active")):
        env = {k: v for k, v in child_env(threads).items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        run = lambda: subprocess.Popen([sys.executable, "-c", BUSY_CHILD, "12"], env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        alone = float(run().communicate()[0])
        pair = [run(), run()]
        together = [float(p.communicate()[0]) for p in pair]
        lines.append(f"| {label} | {alone:.1f} | {together[0]:.1f}, {together[1]:.1f} |")
        print(lines[-1], flush=True)
    lines.append("")


def rollup_kb(pid: int) -> dict:
    figures = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0].endswith(":"):
                figures[parts[0][:-1]] = int(parts[1])
    return figures


def cpu_seconds_by_process() -> dict:
    """{pid: (command line, user + system CPU seconds)} of every process (psutil comes with Ray)."""
    import psutil

    seconds = {}
    for process in psutil.process_iter(["cmdline", "name"]):
        try:
            times = process.cpu_times()
            seconds[process.pid] = (" ".join(process.info["cmdline"] or [process.info["name"] or ""]),
                                    times.user + times.system)
        except (psutil.Error, OSError):
            continue  # gone or not ours to read
    return seconds


def machine_idle_seconds() -> float:
    """Idle CPU-seconds of the whole machine so far (/proc/stat: idle + iowait, every CPU)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


def make_images(directory: str, count: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        base = np.linspace(0, 255, size)[None, :, None] * rng.uniform(0.2, 1, 3)
        pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(directory, f"img{i:05d}.png"))


def throughput(weights: str, cache_dir: str, image_dir: str, count: int, size: int, threads: int, skip_ray: bool,
               lines, batch: int = 64, rounds: int = 3) -> None:
    """Images/s of each pipeline, measured in `rounds` rounds: each round times one process's
    model.predict, the in-process Extractor and each Ray job back to back, and a pipeline's ratio
    to one process is the median over the rounds of its ratio within a round. This VM changes
    speed by 10-20% for minutes at a time; measured once each, minutes apart, the ratios moved by
    as much (a Ray job read 0.80 in one run and 1.14 in the next)."""
    import fastvgg
    from fastvgg.image import img_to_array, load_img

    fastvgg.set_num_threads(threads)
    model = fastvgg.VGG16(weights, include_top=False, pooling="avg", packed_cache=cache_dir)
    paths = sorted(os.path.join(image_dir, n) for n in os.listdir(image_dir))
    x = fastvgg.preprocess_input(np.stack([img_to_array(load_img(p, target_size=(size, size))) for p in paths]))
    model.predict(x[:batch])
    # The Ray actors' own work without Ray: the same Extractor called on batches of decoded
    # images (uint8), which preprocesses, predicts and pools as each actor does.
    import fastvgg.ray as fastvgg_ray

    extractor = fastvgg_ray.Extractor(weights, layer="block5_pool", pooling="avg", packed_cache=cache_dir)
    pixels = np.stack([img_to_array(load_img(p, target_size=(size, size))) for p in paths]).astype(np.uint8)
    extractor({"image": pixels[:batch]})

    def one_process() -> float:
        started = time.perf_counter()
        model.predict(x, batch_size=batch)
        return time.perf_counter() - started

    def in_process_extractor() -> float:
        started = time.perf_counter()
        for first in range(0, len(pixels), batch):
            extractor({"image": pixels[first:first + batch]})
        return time.perf_counter() - started

    def cli() -> float:
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fastvgg", "features", image_dir, "--weights", weights, "--size",
                            str(size), str(size), "--pooling", "avg", "--quiet", "-o", os.path.join(out, "f.npy")],
                           check=True, env={**child_env(threads), "FASTVGG_PACKED_CACHE": cache_dir},
                           capture_output=True)
            return time.perf_counter() - started

    baseline = "one process, model.predict on decoded images"
    rows = {baseline: (f"{threads} threads", []),
            f"one process, the Extractor on batches of {batch} (no Ray)": (f"{threads} threads", []),
            "CLI `fastvgg features DIR`, end to end": (f"{threads} threads + decoding pool", [])}
    runs = dict(zip(rows, (one_process, in_process_extractor, cli)))
    ray_jobs, ray_extra = None, []

    def ray_row(actors: int, part: str) -> list:
        return rows.setdefault(f"Ray Data, {actors} actor(s) x {threads // actors} CPU, {part}",
                               (f"{threads} threads in all", []))[1]

    if not skip_ray:
        ray_jobs = RayJobs(weights, cache_dir, image_dir, count, size, threads, batch)
        for actors in (1, threads):  # the rows in table order
            ray_row(actors, "whole job"), ray_row(actors, "steady state")
    try:
        for round_index in range(rounds):
            for name, run in runs.items():
                rows[name][1].append(run())
            if ray_jobs is not None:
                for actors in (1, threads):
                    whole, steady, note = ray_jobs.run(actors)
                    ray_row(actors, "whole job").append(whole)
                    ray_row(actors, "steady state").append(steady)
                    if round_index == rounds - 1:
                        ray_extra.append(note)
            print(f"round {round_index + 1}:", {name: round(seconds[-1], 2) for name, (_, seconds) in rows.items()},
                  flush=True)
        if ray_jobs is not None:
            ray_extra.append(ray_jobs.fresh_actor_start())
    finally:
        if ray_jobs is not None:
            ray_jobs.shutdown()

    lines += [f"### Throughput (VGG16 without the top, {size}x{size}, block5_pool averaged, {count} PNG images)", "",
              f"{rounds} rounds, each timing every pipeline once, back to back; seconds and images/s are medians over "
              "the rounds, the last column the median of each round's ratio to that round's one process.", "",
              "| pipeline | threads | seconds (median) | images/s | vs one process (median; min-max) |",
              "|---|---|---|---|---|"]
    base = rows[baseline][1]
    for name, (how, seconds) in rows.items():
        ratios = [b / s for b, s in zip(base, seconds)]
        median = statistics.median(seconds)
        lines.append(f"| {name} | {how} | {median:.2f} | {count / median:.1f} | {statistics.median(ratios):.2f}; "
                     f"{min(ratios):.2f}-{max(ratios):.2f} |")
    lines.append("")
    if ray_extra:
        lines += ["Ray actors (last round): " + "; ".join(ray_extra) + ".", ""]


class RayJobs:
    """A local Ray cluster of `threads` CPUs and fastvgg.ray.Extractor jobs on one dataset, read
    and materialised first (so the read tasks do not compete with the actors for the CPUs)."""

    def __init__(self, weights, cache_dir, image_dir, count, size, threads, batch):
        import ray

        import fastvgg.ray as fastvgg_ray

        self.ray, self.weights, self.count, self.threads, self.batch = ray, weights, count, threads, batch
        self.version = tuple(int(part) for part in ray.__version__.split(".")[:2] if part.isdigit())

        class TimedExtractor(fastvgg_ray.Extractor):
            """The Extractor, stamping when its model was ready and when each batch ended."""

            def __init__(self, **kwargs):
                began = time.time()
                super().__init__(**kwargs)
                self.ready = time.time()
                self.init_s = self.ready - began

            def __call__(self, batch):
                began = time.time()
                out = super().__call__(batch)
                n = len(out["block5_pool"])
                out.update(_ready=np.full(n, self.ready), _init_s=np.full(n, self.init_s), _began=np.full(n, began),
                           _done=np.full(n, time.time()))
                return out

        self.timed_extractor = TimedExtractor
        os.environ["FASTVGG_PACKED_CACHE"] = cache_dir  # the actors inherit the driver's environment
        ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        self.dataset = ray.data.read_images(image_dir, size=(size, size), mode="RGB").materialize()

    def run(self, actors: int):
        """(whole job s, steady state s, where the time went) of one job with `actors` actors."""
        ray = self.ray
        # A fixed pool of `actors`: Ray 2.51 deprecated `concurrency` for `compute`.
        pool = (dict(compute=ray.data.ActorPoolStrategy(size=actors)) if self.version >= (2, 51)
                else dict(concurrency=actors))
        mapped = self.dataset.map_batches(self.timed_extractor, fn_constructor_kwargs=dict(
            weights=self.weights, layer="block5_pool", pooling="avg"), **pool,
            num_cpus=self.threads // actors, batch_size=self.batch, batch_format="numpy")
        cpu_before, idle_before = cpu_seconds_by_process(), machine_idle_seconds()
        started = time.perf_counter()
        result = mapped.materialize()
        elapsed = time.perf_counter() - started
        cpu_after, idle = cpu_seconds_by_process(), machine_idle_seconds() - idle_before
        stamps = result.select_columns(["_ready", "_init_s", "_began", "_done"]).to_pandas()
        assert len(stamps) == self.count
        # Steady state: images from the first actor's model being ready to the last batch's end.
        steady = stamps["_done"].max() - stamps["_ready"].min()
        # Where the steady state goes: the actors' own calls (begin to end of each batch,
        # summed over the batches, divided by the actors working at once) against the rest
        # (Ray moving batches between calls, and its processes' CPU while the calls run).
        calls = stamps.drop_duplicates(["_began", "_done"])
        in_calls = float((calls["_done"] - calls["_began"]).sum()) / actors
        # The machine's CPU-seconds over the job: idle (/proc/stat), Ray's daemons and the
        # driver (alive before and after), and the actors (the rest: their processes may
        # be gone by the time the job returns).
        others = sum(cpu_after[pid][1] - cpu_before[pid][1] for pid in cpu_after
                     if pid in cpu_before and "MapWorker" not in cpu_after[pid][0])
        total = elapsed * (os.cpu_count() or self.threads)
        note = (f"{actors} actor(s): model built in the actor in {stamps['_init_s'].max():.3f} s; "
                f"the Extractor's calls take {in_calls:.2f} s of the {steady:.2f} s steady state "
                f"({len(calls)} batches); of the machine's {total:.1f} CPU-seconds during the job, "
                f"{idle:.1f} went idle, Ray's other processes and the driver took {others:.1f}, "
                f"the actors the other {max(0.0, total - idle - others):.1f}")
        return elapsed, steady, note

    def fresh_actor_start(self) -> str:
        """Ray's creation of a fresh actor to ready, the Extractor's share of it, and Ray's own
        floor: an actor of the same CPUs that imports and builds nothing, created the same way."""
        ray, weights = self.ray, self.weights
        import fastvgg.ray as fastvgg_ray

        @ray.remote(num_cpus=self.threads)
        class Probe:
            def __init__(self):
                began = time.time()
                self.extractor = fastvgg_ray.Extractor(weights, layer="block5_pool", pooling="avg")
                self.init_s = time.time() - began

            def init_seconds(self):
                return self.init_s

        @ray.remote(num_cpus=self.threads)
        class Empty:
            def init_seconds(self):
                return 0.0

        def created_to_ready(actor_class):
            began = time.perf_counter()
            actor = actor_class.remote()
            init_s = ray.get(actor.init_seconds.remote())
            elapsed = time.perf_counter() - began
            ray.kill(actor)
            return elapsed, init_s

        starts, floors = [], []
        for _ in range(3):  # interleaved, so that both see the same machine
            starts.append(created_to_ready(Probe))
            floors.append(created_to_ready(Empty)[0])
        return ("a fresh actor (median of 3): created to ready in "
                f"{statistics.median(s[0] for s in starts):.2f} s, of which the Extractor (model "
                f"mapped from the warm cache) {statistics.median(s[1] for s in starts):.3f} s; Ray's floor, "
                f"an empty actor of the same CPUs created the same way: {statistics.median(floors):.2f} s")

    def shutdown(self) -> None:
        self.ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="images a batch (model.predict, Ray's map_batches)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the throughput comparison")
    parser.add_argument("--throughput-only", action="store_true", help="skip the load, memory and sharing parts")
    parser.add_argument("--output", default=os.path.join(HERE, "scale-results.md"))
    args = parser.parse_args()

    import fastvgg
    from fastvgg import _core

    lines = ["# Scaling out: packed cache, N processes, CLI and Ray Data", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; fastvgg {fastvgg.__version__}, kernels "
             f"{_core.active_isa()}, {os.cpu_count()} CPUs visible, {args.threads} threads; random weights. "
             "Command: `python bench/scale.py " + " ".join(sys.argv[1:]) + "`.", ""]
    with tempfile.TemporaryDirectory() as work:
        weights = os.path.join(work, "vgg16.h5")
        cache_dir = os.path.join(work, "packed")
        image_dir = os.path.join(work, "images")
        os.makedirs(image_dir)
        write_weights(weights)
        if not args.throughput_only:  # the throughput part's first model load fills the packed cache
            load_times(weights, cache_dir, args.threads, lines)
            memory_of_n(weights, cache_dir, args.processes, lines)
            contention(args.threads, lines)
        make_images(image_dir, args.images, max(args.size, 128))
        throughput(weights, cache_dir, image_dir, args.images, args.size, args.threads, args.skip_ray, lines,
                   args.batch, args.rounds)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
