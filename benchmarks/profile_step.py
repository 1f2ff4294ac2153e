"""Where a training step's time goes: the operators that take the most device time in `RelPosBertModel`'s
forward+backward, next to transformers' `BertModel` (sdpa) of the same size, both profiled in one run.

    python benchmarks/profile_step.py --encodings rope,alibi [--kernel sdpa] [--length 2048] [--size base]
        [--dtype bfloat16] [--batch 4] [--steps 3] [--rows 12]

Uses benchmarks/run.py's models; on CUDA the table is sorted by self CUDA time, on CPU by self CPU time.
"""

import argparse

import run  # first: it quiets the profiler's log before torch loads
import torch
from torch.profiler import ProfilerActivity, profile


def profiled(name: str, step, steps: int, rows: int) -> str:
    step()
    step()  # warm-up: kernel selection, autotuning, allocator growth
    cuda = run.DEVICE.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    run.synchronize()
    with profile(activities=activities) as trace:
        for _ in range(steps):
            step()
        run.synchronize()
    table = trace.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                       row_limit=rows, max_name_column_width=60)
    return f"== {name}: {steps} steps ==\n{table}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encodings", default="rope,alibi")
    parser.add_argument("--kernel", default="sdpa")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--size", choices=sorted(run.SIZES), default="base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args(argv)
    run.configure(args.size, args.device, args.dtype, args.batch)
    torch.manual_seed(0)
    input_ids = run.token_ids(args.length, run.BATCH)
    model, _ = run.anchor_model("BertModel:sdpa", args.length)
    print(profiled("BertModel:sdpa", run.train_step(model.train(), input_ids), args.steps, args.rows), flush=True)
    for encoding in run.encoding_list(args.encodings):
        model = run.relpos_encoder(encoding, args.kernel, args.length)
        print(profiled(f"relpos:{encoding}:{args.kernel}", run.train_step(model.train(), input_ids), args.steps,
                       args.rows), flush=True)


if __name__ == "__main__":
    main()
