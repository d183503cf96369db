"""
Draws time_mixing.gif and channel_mixing.gif (the README's are in assets/): tokens flowing one at a time through an
RWKV-4 block of this repository (model_rwkv.py, random weights, 8 channels), in RNN mode, every number the one the
model computes.

time mixing, per token t: token shift mixes x_t with x_{t-1} per channel (time_mix) into the inputs of k, v and r;
the decayed sums a (numerator) and b (denominator) take e^{u+k_t} v_t for the output and then decay by e^{-w} and
add e^{k_t}; y_t = (a + e^{u+k} v) / (b + e^{u+k}) is gated by sigmoid(r_t).
channel mixing: the same token shift, a squared-ReLU key of width 4C, a value back to C, gated by sigmoid(r_t).

$ python assets/make_animations.py                   # into out-figures/ (git-ignored)
$ python assets/make_animations.py --out_dir=assets   # the README's
$ python assets/make_animations.py --frames=3         # a quick look
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configurator import Option, parse_config, run_script  # noqa: E402
from model_rwkv import RWKV, RWKVConfig  # noqa: E402

OPTIONS = dict(
    frames=Option(12, "tokens, one frame each", '>= 1'),
    n_embd=Option(8, "channels drawn", '>= 2'),
    fps=Option(1.5, "frames per second", '> 0'),
    out_dir=Option('out-figures', "where the two GIFs go ('assets' replaces the README's)"),
    seed=Option(0, "seeds the weights and the tokens", '>= 0'),
)


def trace(cfg):
    """Per token, the named vectors of block 0's time mix and channel mix, as the model's step computes them."""
    torch.manual_seed(cfg.seed)
    model = RWKV(RWKVConfig(vocab_size=16, n_layer=1, n_embd=cfg.n_embd, wkv_backend='torch')).double().eval()
    with torch.no_grad():  # RWKV-LM's init zeroes several matrices; random weights show every path
        for n, p in model.named_parameters():
            if 'time_' not in n:
                p.add_(0.5 * torch.randn_like(p))
    block, att, ffn = model.blocks[0], model.blocks[0].att, model.blocks[0].ffn
    tokens = torch.randint(0, 16, (cfg.frames,))
    state = model.initial_state(1).layer(0)
    w, u = torch.exp(att.time_decay).detach(), att.time_first.detach()
    a, b = torch.zeros(cfg.n_embd, dtype=torch.float64), torch.zeros(cfg.n_embd, dtype=torch.float64)
    frames = []
    with torch.no_grad():
        for t, token in enumerate(tokens):
            emb = model.emb(token[None])
            x = block.ln0(emb)
            xa, prev = block.ln1(x), state.x_att.double()
            k = att.key(torch.lerp(prev, xa, att.time_mix_k[0]))[0]
            v = att.value(torch.lerp(prev, xa, att.time_mix_v[0]))[0]
            r = att.receptance(torch.lerp(prev, xa, att.time_mix_r[0]))[0]
            e = torch.exp(u + k)
            y = (a + e * v) / (b + e)
            f = dict(t=t, x=xa[0], x_prev=prev[0], k=k, v=v, r=r, a=a.clone(), b=b.clone(), y=y,
                     gated=torch.sigmoid(r) * y)
            a, b = torch.exp(-w) * a + torch.exp(k) * v, torch.exp(-w) * b + torch.exp(k)
            out, new_state, _, _ = block(emb[:, None], state)  # the model's own block at T = 1: the same numbers
            out = out[:, 0]
            x_mid = x + att.output(f['gated'][None])
            xf, fprev = block.ln2(x_mid), state.x_ffn.double()
            key = torch.relu(ffn.key(torch.lerp(fprev, xf, ffn.time_mix_k[0]))) ** 2
            rr = ffn.receptance(torch.lerp(fprev, xf, ffn.time_mix_r[0]))
            f.update(fx=xf[0], fx_prev=fprev[0], key=key[0], fr=torch.sigmoid(rr)[0],
                     fout=(torch.sigmoid(rr) * ffn.value(key))[0])
            assert torch.allclose(x_mid + f['fout'], out)  # what is drawn is what the model computes
            state = new_state
            frames.append(f)
    return frames, w


def animate(frames, rows, title, path, fps):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter
    fig, axes = plt.subplots(len(rows), 1, figsize=(6, 1.0 * len(rows) + 0.8), squeeze=False)
    axes = axes[:, 0]
    limits = {key: max(float(f[key].abs().max()) for f in frames) or 1.0 for key, _ in rows}

    def draw(i):
        f = frames[i]
        for ax, (key, label) in zip(axes, rows):
            ax.clear()
            values = f[key]
            ax.bar(range(len(values)), values.tolist(), color=['tab:red' if z < 0 else 'tab:blue' for z in values])
            ax.set_ylim(-limits[key] * 1.1, limits[key] * 1.1)
            ax.set_ylabel(label, rotation=0, ha='right', va='center', fontsize=8)
            ax.set_xticks([])
            ax.tick_params(labelsize=6)
        axes[-1].set_xlabel('channel')
        fig.suptitle(f'{title}: token {f["t"]}', fontsize=10)
    fig.subplots_adjust(left=0.3, hspace=0.5, top=0.92)
    FuncAnimation(fig, draw, frames=len(frames)).save(path, writer=PillowWriter(fps=fps))
    plt.close(fig)


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    frames, _ = trace(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    animate(frames, [('x_prev', 'x(t-1)  token shift'), ('x', 'x(t)'), ('k', 'k = K mix_k'), ('v', 'v = V mix_v'),
                     ('a', 'a  (decayed sum of\ne^k v, before t)'), ('b', 'b  (decayed sum\nof e^k)'),
                     ('y', 'y = (a + e^(u+k) v)\n/ (b + e^(u+k))'), ('r', 'r = R mix_r'),
                     ('gated', 'sigmoid(r) * y')], 'time mixing', out / 'time_mixing.gif', cfg.fps)
    animate(frames, [('fx_prev', 'x(t-1)  token shift'), ('fx', 'x(t)'), ('key', 'relu(K mix_k)^2\n(4C wide)'),
                     ('fr', 'sigmoid(R mix_r)'), ('fout', 'sigmoid(r) * V key')], 'channel mixing',
            out / 'channel_mixing.gif', cfg.fps)
    print(f"wrote {out / 'time_mixing.gif'} and {out / 'channel_mixing.gif'} ({cfg.frames} frames)")


if __name__ == '__main__':
    run_script(main)
