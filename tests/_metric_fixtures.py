"""What the metric tests share: a stand-in model that 'samples' given images, and the FID Inception network with
random weights (pytorch-fid's file cannot be fetched here)."""
from __future__ import annotations

import torch


class ReplayModel(torch.nn.Module):
    """A stand-in consistency model whose one-step samples are given images, in order (its image shape is theirs)."""
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, images):
        super().__init__()
        self.images, self.pos = images, 0
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.img_resolution, self.img_channels = images.shape[-1], images.shape[1]

    def forward(self, x, sigma, class_labels=None):
        out = self.images[self.pos:self.pos + len(x)]
        self.pos += len(x)
        return out


def random_fid_inception(seed=0, fc_bias_scale=0.1):
    """The FID architecture with random weights (fan-in scaled so 94 layers keep finite activations); the fc bias
    drawn at fc_bias_scale (large: logits that applied it would differ)."""
    from cmfast._inception import FIDInception
    with torch.device("meta"):
        net = FIDInception()
    net = net.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    for name, t in net.net.state_dict().items():
        if t.dim() > 1:
            t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
        elif name.endswith(("running_var", "bn.weight")):
            t.fill_(1.0)
        elif name == "fc.bias":
            t.copy_(torch.randn(t.shape, generator=g) * fc_bias_scale)
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1 if t.is_floating_point() else torch.zeros_like(t))
    return net


def tiny_checkpoint(folder, img_resolution=16):
    """(model, checkpoint path): a seed-0 tiny consistency model (eval mode) saved as an iCT run's checkpoint in
    `folder` (made), for cmfast-eval."""
    import cmfast
    from cmfast.nets import preset_config
    from cmfast.training.checkpoint import save_checkpoint
    torch.manual_seed(0)
    cm = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny", img_resolution=img_resolution)).eval()
    cfg = dict(method="ict", net=preset_config("tiny", img_resolution=img_resolution), sigma_data=0.5,
               sigma_min=0.002, sigma_max=80.0)
    folder.mkdir(parents=True, exist_ok=True)
    return cm, save_checkpoint(str(folder), 1, {"ema": cm.state_dict()}, cfg, {})
