"""``python -m benchmarks regularization``: what rnnfused's regularization options cost.

For each cell and shape, side by side in one run (measure_interleaved, training mode, float32):
  plain      rnnfused's layer without options
  <option>   the same layer with one option on (recurrent_dropout, dropconnect, zoneout, and for the
             LSTM cell_zoneout; "all" turns every option of the cell on); "layer_norm" is
             rnnfused.LayerNormLSTM / LayerNormGRU without options
  loop       what a user writes without rnnfused: a per-step Python loop of torch operations with
             the same option (torch.nn has none of them), one step = one F.linear of h and the
             cell's pointwise math; for "plain" it is torch.nn's own layer instead
The table gives each option's time relative to plain rnnfused (its cost) and the loop's time
relative to rnnfused with the option (the speedup a user gets).
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

import rnnfused

from . import timing

CELLS = ("lstm", "gru", "rnn_tanh")
OPTIONS = {
    "lstm": ("recurrent_dropout", "dropconnect", "zoneout", "cell_zoneout", "all", "layer_norm"),
    "gru": ("recurrent_dropout", "dropconnect", "zoneout", "all", "layer_norm"),
    "rnn_tanh": ("recurrent_dropout", "dropconnect", "zoneout", "all"),
}
# The probabilities of the options when on (typical values of the literature).
VALUES = {"recurrent_dropout": 0.25, "dropconnect": 0.5, "zoneout": 0.1, "cell_zoneout": 0.05}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    steps: int
    batch: int
    input_size: int
    hidden: int


SHAPES = {
    "quick": (Shape("batch4_T50", 50, 4, 256, 256), Shape("small_batch_T50", 50, 16, 256, 256),
              Shape("fastrnns_T25", 25, 64, 512, 512)),
    "tiny": (Shape("tiny", 4, 3, 5, 6),),  # for the tests of this module's plumbing
}


def option_kwargs(cell, option):
    if option in ("plain", "layer_norm"):
        return {}
    names = [name for name in OPTIONS[cell] if name in VALUES] if option == "all" else (option,)
    return {name: VALUES[name] for name in names}


def dropout_mask(like, p):
    """Masks drawn as rnnfused draws them (a uniform draw compared with p: cheaper than torch's CPU
    Bernoulli), so that both sides pay the same for their random numbers."""
    return (torch.rand_like(like) >= p).to(like.dtype) / (1 - p)


def loop_layer(cell, module, x, kwargs, layer_norm=False):
    """The per-step loop a user writes: x [T, B, I] -> output [T, B, H], with the module's weights
    and the options in ``kwargs`` (drawn as rnnfused draws them; the loop is the baseline's cost, not
    a bit-exact twin). ``layer_norm``: the LayerNorm cell, with the module's gains and biases."""
    steps, batch = x.shape[0], x.shape[1]
    hidden = module.hidden_size
    w_ih, w_hh, b_ih, b_hh = module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0
    if kwargs.get("dropconnect"):
        w_hh = w_hh * dropout_mask(w_hh, kwargs["dropconnect"])
    h = x.new_zeros(batch, hidden)
    c = x.new_zeros(batch, hidden)
    mask = dropout_mask(h, kwargs["recurrent_dropout"]) if kwargs.get("recurrent_dropout") else None
    width = w_hh.shape[0]
    if layer_norm:
        gates_x = F.layer_norm(F.linear(x, w_ih), (width,), module.layer_norm_ih_weight_l0,
                               module.layer_norm_ih_bias_l0) + b_ih
    else:
        gates_x = F.linear(x, w_ih, b_ih)
    outputs = []
    for t in range(steps):
        if layer_norm:
            gates_h = F.layer_norm(F.linear(h if mask is None else h * mask, w_hh), (width,),
                                   module.layer_norm_hh_weight_l0, module.layer_norm_hh_bias_l0) + b_hh
        else:
            gates_h = F.linear(h if mask is None else h * mask, w_hh, b_hh)
        if cell == "lstm":
            i, f, g, o = (gates_x[t] + gates_h).chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            c_out = c_new
            if layer_norm:
                c_out = F.layer_norm(c_new, (hidden,), module.layer_norm_cell_weight_l0, module.layer_norm_cell_bias_l0)
            h_new = torch.sigmoid(o) * torch.tanh(c_out)
            if kwargs.get("cell_zoneout"):
                keep = (torch.rand_like(c) < kwargs["cell_zoneout"]).to(c.dtype)
                c_new = keep * c + (1 - keep) * c_new
            c = c_new
        elif cell == "rnn_tanh":
            h_new = torch.tanh(gates_x[t] + gates_h)
        else:
            x_r, x_z, x_n = gates_x[t].chunk(3, 1)
            h_r, h_z, h_n = gates_h.chunk(3, 1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            h_new = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
        if kwargs.get("zoneout"):
            keep = (torch.rand_like(h) < kwargs["zoneout"]).to(h.dtype)
            h_new = keep * h + (1 - keep) * h_new
        h = h_new
        outputs.append(h)
    return torch.stack(outputs)


def make_step(run, x, mode):
    def step():
        out = run(x)
        if mode == "fwdbwd":
            out.sum().backward()
        return out

    return step


def measure(cells, shapes, modes, min_run_time, rounds, options=None):
    rows = []
    for shape in shapes:
        for cell in cells:
            torch.manual_seed(0)
            classes = {"lstm": (rnnfused.LSTM, torch.nn.LSTM), "gru": (rnnfused.GRU, torch.nn.GRU),
                       "rnn_tanh": (rnnfused.RNN, torch.nn.RNN)}
            layer_norm_classes = {"lstm": rnnfused.LayerNormLSTM, "gru": rnnfused.LayerNormGRU}
            ours_cls, ref_cls = classes[cell]
            reference = ref_cls(shape.input_size, shape.hidden)
            for mode in modes:
                x = torch.randn(shape.steps, shape.batch, shape.input_size, requires_grad=mode == "fwdbwd")
                for option in ("plain",) + tuple(o for o in OPTIONS[cell] if options is None or o in options):
                    kwargs = option_kwargs(cell, option)
                    cls = layer_norm_classes[cell] if option == "layer_norm" else ours_cls
                    module = cls(shape.input_size, shape.hidden, **kwargs)
                    # torch.nn's weights; a LayerNorm cell keeps its own gains (1) and biases (0).
                    module.load_state_dict(reference.state_dict(), strict=option != "layer_norm")
                    fused = make_step(lambda v, m=module: m(v)[0], x, mode)
                    if option == "plain":
                        loop = make_step(lambda v: reference(v)[0], x, mode)
                    else:
                        loop = make_step(lambda v, m=module, k=kwargs, n=option == "layer_norm":
                                         loop_layer(cell, m, v, k, n), x, mode)
                    timing.warm_up(fused, "cpu", calls=2)
                    timing.warm_up(loop, "cpu", calls=2)
                    times = timing.measure_interleaved({"rnnfused": fused, "loop": loop}, min_run_time, rounds)
                    rows.append({"cell": cell, "shape": shape.name, "mode": mode, "option": option,
                                 "rnnfused_ms": times["rnnfused"].median_ms,
                                 "loop_ms": times["loop"].median_ms})
    plain = {(r["cell"], r["shape"], r["mode"]): r["rnnfused_ms"] for r in rows if r["option"] == "plain"}
    for r in rows:
        r["cost_vs_plain"] = r["rnnfused_ms"] / plain[(r["cell"], r["shape"], r["mode"])]
        r["loop_vs_rnnfused"] = r["loop_ms"] / r["rnnfused_ms"]
    return rows


def markdown(rows):
    lines = ["| cell | shape | mode | option | rnnfused ms | x plain rnnfused | loop ms | loop / rnnfused |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        loop_name = "torch.nn" if r["option"] == "plain" else "loop"
        lines.append(f"| {r['cell']} | {r['shape']} | {r['mode']} | {r['option']} | {r['rnnfused_ms']:.2f} | "
                     f"{r['cost_vs_plain']:.2f} | {r['loop_ms']:.2f} ({loop_name}) | {r['loop_vs_rnnfused']:.2f} |")
    return "\n".join(lines)


def main(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks regularization",
        description="The cost of recurrent_dropout, dropconnect, zoneout and cell_zoneout over plain rnnfused, and "
                    "rnnfused against a per-step PyTorch loop with the same option (CPU, float32, training mode).",
    )
    parser.add_argument("--preset", choices=sorted(SHAPES), default="quick")
    parser.add_argument("--cell", default=",".join(CELLS), help="comma list of lstm, gru, rnn_tanh")
    parser.add_argument("--mode", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    parser.add_argument("--option", default=None,
                        help="comma list of the options to time besides plain (default: every option of the cell)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per side and case")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    cells = [c for c in args.cell.split(",") if c]
    modes = [m for m in args.mode.split(",") if m]
    for cell in cells:
        if cell not in CELLS:
            parser.error(f"--cell: {cell!r} is not one of {', '.join(CELLS)}")
    for mode in modes:
        if mode not in ("fwd", "fwdbwd"):
            parser.error(f"--mode: {mode!r} is not one of fwd, fwdbwd")
    if args.threads:
        torch.set_num_threads(args.threads)
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "rnnfused": rnnfused.build_info(), "load": os.getloadavg()[0],
    }
    options = [o for o in args.option.split(",") if o] if args.option else None
    known = {o for cell in cells for o in OPTIONS[cell]}
    for option in options or ():
        if option not in known:
            parser.error(f"--option: {option!r} is not one of {', '.join(sorted(known))}")
    rows = measure(cells, SHAPES[args.preset], modes, args.min_run_time, args.rounds, options)
    print(f"{header['date']}, {header['threads']} threads, torch {header['torch']}, rnnfused CPU "
          f"{header['rnnfused']['cpu_isa']} / {header['rnnfused']['cpu_path']}, load {header['load']:.2f}")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
