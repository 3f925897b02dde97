"""Step time, peak memory per rank and the gradient bytes at the optimizer step, for AdamW, SAM, SL-SAM and
``slsam_noisy`` on a Llama-shaped causal LM sharded with FSDP2 over 1 and 2 ranks.

    python experiments/bench_sharded.py                       # CPU preset, 1 and 2 ranks (gloo), all methods
    python experiments/bench_sharded.py --preset gpu --ranks 1 # on a CUDA machine (nccl), what one GPU can show
    python experiments/bench_sharded.py --preset tiny          # seconds; the test suite runs it

Each (method, ranks) pair runs in fresh processes (``torch.multiprocessing``, one per rank): the model (a random
``LlamaConfig`` of the preset, one FSDP2 unit per decoder layer and the model as the root), AdamW (lr 1e-5, weight
decay 0.01: the authors' LLM recipe) wrapped by ``lightning_slsam.optim`` (rho 0.01, sparsity 0.2), ``--warmup``
untimed steps, then ``--steps`` timed ones on random tokens (``--batch`` sequences of ``--seq`` tokens per rank).

Measured per rank and reported as the mean over ranks:

- ``step_s``: median wall time of a step (CUDA synchronised at both ends);
- ``peak_mib``: on CUDA ``max_memory_allocated`` over the timed steps; on a CPU the growth of the process's peak RSS
  over the timed steps (VmHWM after resetting the kernel's counter at the end of the warm-up, minus the RSS then,
  as ``bench_step.py`` measures it): what the steps allocate beyond the model and AdamW's state, which exist from
  the warm-up on;
- ``grad_mib``: the bytes of the gradients that exist when the optimizer steps (the local shards of every
  parameter with a gradient, counted at the optimizer's step pre-hook: deterministic, no allocator involved), and
  ``grad_ratio`` against a dense step's (every parameter's shard).

Writes ``sharded_<preset>_<machine>.json`` and ``.md`` into ``--out`` (default experiments/results/sharded).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_step, beside this file
import bench_step  # its memory probes and machine description

PRESETS: dict[str, dict[str, int]] = {
    # layers, width, heads, vocabulary, tokens per sequence, sequences per rank
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "vocab": 512, "seq": 32, "batch": 2},
    "cpu": {"layers": 8, "hidden": 512, "heads": 8, "vocab": 8192, "seq": 128, "batch": 2},
    "gpu": {"layers": 16, "hidden": 2048, "heads": 16, "vocab": 32768, "seq": 1024, "batch": 4},
}
#: optim class and arguments of each method (the authors' LLM recipe: rho 0.01, sparsity 0.2)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "base": ("Base", {}),
    "sam": ("SAM", {"rho": 0.01}),
    "slsam": ("SLSAM", {"rho": 0.01, "sparsity": 0.2, "seed": 0}),
    "slsam_noisy": ("SLSAMNoisy", {"rho": 0.01, "sparsity": 0.2, "seed": 0}),
}


def build_model(preset: dict[str, int], device: torch.device) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=preset["vocab"],
        hidden_size=preset["hidden"],
        intermediate_size=3 * preset["hidden"],
        num_hidden_layers=preset["layers"],
        num_attention_heads=preset["heads"],
        num_key_value_heads=max(1, preset["heads"] // 2),
        max_position_embeddings=max(2048, preset["seq"]),
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(device)


def run_rank(rank: int, world: int, port: int, method: str, preset_name: str, args: dict, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_slsam import optim
    from lightning_slsam.engine.sharding import local
    from lightning_slsam.models.causal_lm import decoder_layers, next_token_loss

    torch.set_num_threads(args["threads"])
    cuda = torch.cuda.is_available() and not args["cpu"]
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    preset = PRESETS[preset_name]
    model = build_model(preset, device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    cls, kwargs = METHODS[method]
    base = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    opt = getattr(optim, cls)(model, base, **kwargs)
    grad_bytes: list[int] = []
    dense_bytes = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    base.register_step_pre_hook(
        lambda *_: grad_bytes.append(
            sum(local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters() if p.grad is not None)
        )
    )
    generator = torch.Generator().manual_seed(1 + rank)
    tokens = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq"]), generator=generator).to(device)

    def closure() -> torch.Tensor:
        return next_token_loss(model(input_ids=tokens).logits, tokens)

    times = []
    for step in range(args["warmup"] + args["steps"]):
        if step == args["warmup"]:
            grad_bytes.clear()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            else:
                rss_growth = bench_step.PeakRssGrowth()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step(closure)
        opt.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        if step >= args["warmup"]:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else rss_growth.read()["peak_rss_growth_mib"]
    record = {
        "rank": rank,
        "step_s": statistics.median(times),
        "peak_mib": peak,
        "grad_mib": statistics.mean(grad_bytes) / 2**20 if grad_bytes else 0.0,
        "dense_grad_mib": dense_bytes / 2**20,
        "params": sum(p.numel() for p in model.parameters()),
    }
    with open(os.path.join(out, f"{method}_{world}_{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_line(cpu: bool) -> str:
    if torch.cuda.is_available() and not cpu:
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{bench_step.cpu_model()}, {bench_step.available_cores()} cores, torch {torch.__version__}"


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| method | ranks | step (s) | step vs AdamW | peak memory per rank (MiB) | peak vs AdamW | gradients at the "
        "optimizer step (MiB per rank) | vs a dense step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {r["ranks"]: r for r in results if r["method"] == "base"}
    for r in results:
        b = base.get(r["ranks"])
        time_ratio = f"{r['step_s'] / b['step_s']:.2f}x" if b else "n/a"
        memory_ratio = f"{r['peak_mib'] / b['peak_mib']:.2f}x" if b and b["peak_mib"] > 0 else "n/a"
        rows.append(
            f"| {r['method']} | {r['ranks']} | {r['step_s']:.3f} | {time_ratio} | {r['peak_mib']:.1f} | "
            f"{memory_ratio} | {r['grad_mib']:.2f} | {r['grad_mib'] / r['dense_grad_mib']:.2f}x |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default 1)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sharded"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    raw = out / f"raw_{args.preset}"
    raw.mkdir(parents=True, exist_ok=True)
    options = {"threads": args.threads, "warmup": args.warmup, "steps": args.steps, "cpu": args.cpu}
    results = []
    for world in args.ranks:
        for method in args.methods:  # interleaved: every method at one rank count before the next
            port = free_port()
            mp.start_processes(
                run_rank,
                args=(world, port, method, args.preset, options, str(raw)),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
            ranks = [json.loads((raw / f"{method}_{world}_{r}.json").read_text()) for r in range(world)]
            results.append(
                {
                    "method": method,
                    "ranks": world,
                    **{k: statistics.mean(x[k] for x in ranks) for k in ("step_s", "peak_mib", "grad_mib")},
                    "dense_grad_mib": ranks[0]["dense_grad_mib"],
                    "params": ranks[0]["params"],
                }
            )
            print(f"{method} x{world}: {results[-1]}", flush=True)
    machine = machine_line(args.cpu)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else f"cpu-{args.threads}t"
    summary = {
        "preset": args.preset,
        "shape": PRESETS[args.preset],
        "machine": machine,
        "options": options,
        "results": results,
    }
    stem = out / f"sharded_{args.preset}_{device}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    command = "python experiments/bench_sharded.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stem.with_suffix(".md").write_text(
        f"Sharded step benchmark, preset `{args.preset}` ({PRESETS[args.preset]}), {results[0]['params'] / 1e6:.1f} M "
        f"parameters; {machine}; {args.warmup} warm-up and {args.steps} timed steps; `{command.strip()}`\n\n"
        + table(results)
    )
    print(table(results))
    return results


if __name__ == "__main__":
    main()
