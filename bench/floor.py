"""The floor of one training epoch: the arithmetic an epoch of the MLP must do, and nothing around it.

Per step, on the same shapes as the trainer (batch B, 784 -> hidden... -> 10), into buffers allocated
once: the uint8 -> float32 cast and the normalisation, each layer's `addmm` and ReLU, log-softmax and
the loss, the logits' gradient, the weight gradients (`mm`), bias gradients (`sum`), the hidden
layers' input gradients (`mm`, ReLU mask), the correct-prediction count, and Adam on one flat buffer
of all parameters. No autograd, no modules, no optimizer object, no allocation: what is left is the
kernels themselves and one Python call each. `bench_training.py` and `gpu_check.py` print the
trainer's epoch divided by this.
"""

from __future__ import annotations

import time

import torch


class FloorStep:
    """One training step of the MLP by hand, into preallocated buffers. `weights[k]` (out, in) and
    `biases[k]` are views into the flat `params`; their gradients views into the flat `grad`."""

    def __init__(self, sizes: tuple[int, ...], batch: int, device: torch.device, mean: float = 33.32,
                 std: float = 78.57, lr: float = 3e-3):
        self.batch, self.mean, self.std, self.lr = batch, mean, std, lr
        shapes = [(out, inp) for inp, out in zip(sizes[:-1], sizes[1:])]
        numel = sum(o * i + o for o, i in shapes)
        # Parameters, gradients and Adam's moments each in one flat buffer; the layers are views.
        self.params, self.grad, self.m, self.v, self.denom = (torch.zeros(numel, device=device) for _ in range(5))
        self.weights, self.biases, self.gweights, self.gbiases, off = [], [], [], [], 0
        for o, i in shapes:
            self.weights.append(self.params[off : off + o * i].view(o, i))
            self.gweights.append(self.grad[off : off + o * i].view(o, i))
            off += o * i
            self.biases.append(self.params[off : off + o])
            self.gbiases.append(self.grad[off : off + o])
            off += o
        self.acts = [torch.empty(batch, sizes[0], device=device)] + [torch.empty(batch, o, device=device) for o, _ in shapes]
        self.grads = [None] + [torch.empty(batch, o, device=device) for o, _ in shapes]
        self.logp = torch.empty(batch, sizes[-1], device=device)
        self.picked = torch.empty(batch, 1, device=device)
        self.minus_one = torch.full((batch, 1), -1.0, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), device=device)

    @torch.no_grad()
    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """xb uint8 (B, 784), yb int64 (B, 1)."""
        acts, grads, layers = self.acts, self.grads, len(self.weights)
        acts[0].copy_(xb).sub_(self.mean).div_(self.std)
        for k in range(layers):
            torch.addmm(self.biases[k], acts[k], self.weights[k].t(), out=acts[k + 1])
            if k < layers - 1:
                acts[k + 1].relu_()
        torch.log_softmax(acts[layers], 1, out=self.logp)
        torch.gather(self.logp, 1, yb, out=self.picked)
        self.loss_sum -= self.picked.sum()
        self.correct += (acts[layers].argmax(1) == yb[:, 0]).sum()
        gz = grads[layers]
        torch.exp(self.logp, out=gz)  # softmax
        gz.scatter_add_(1, yb, self.minus_one).div_(self.batch)  # d(mean loss) / d(logits)
        for k in range(layers - 1, -1, -1):
            torch.mm(grads[k + 1].t(), acts[k], out=self.gweights[k])
            torch.sum(grads[k + 1], 0, out=self.gbiases[k])
            if k > 0:
                torch.mm(grads[k + 1], self.weights[k], out=grads[k])
                grads[k].masked_fill_(acts[k] <= 0, 0)
        self.m.lerp_(self.grad, 0.1)
        self.v.mul_(0.999).addcmul_(self.grad, self.grad, value=0.001)
        torch.sqrt(self.v, out=self.denom).add_(1e-8)
        self.params.addcdiv_(self.m, self.denom, value=-self.lr)


def epoch_floor(n: int = 50_000, batch: int = 256, sizes: tuple[int, ...] = (784, 50, 10),
                device: str | torch.device = "cpu", epochs: int = 3) -> float:
    """Median seconds of `epochs` floor epochs of n // batch steps (random data: the arithmetic does
    not depend on the values)."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    steps = n // batch
    images = torch.randint(0, 256, (steps * batch, sizes[0]), dtype=torch.uint8, generator=g).to(dev)
    labels = torch.randint(0, sizes[-1], (steps * batch, 1), generator=g).to(dev)
    step = FloorStep(sizes, batch, dev)
    step.params.normal_(0, 0.05, generator=None)
    times = []
    for _ in range(epochs):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for s in range(steps):
            step(images[s * batch : (s + 1) * batch], labels[s * batch : (s + 1) * batch])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
