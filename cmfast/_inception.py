"""The FID Inception-V3 (Heusel et al. 2017) as pytorch-fid and torch-fidelity run it, on torchvision's layout.

The weights pt_inception-2015-12-05-6726825d.pth are TensorFlow's 2015-12-05 Inception graph ported to
PyTorch by pytorch-fid. That graph differs from torchvision's Inception3 in its pooling branches: the average
pools exclude the zero padding (TensorFlow's behaviour) and the last block (Mixed_7c) max-pools. Everything
else, including parameter names, is torchvision's, so the state dict loads strictly into this module.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
IMPLEMENTATION = "cmfast FID Inception-V3 (pytorch-fid layout and weights, bilinear resize to 299, pool3 2048-d)"
IS_IMPLEMENTATION = ("cmfast Inception Score (Salimans et al. 2016): the same Inception-V3, softmax of its 1008 logits "
                     "without the output bias, mean and std over consecutive splits")


def _avg_pool_tf(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _blocks():
    """The three patched Inception block classes (torchvision imported lazily)."""
    from torchvision.models import inception as tv

    class FIDInceptionA(tv.InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))]

    class FIDInceptionC(tv.InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                         self.branch7x7dbl_5):
                d = conv(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_tf(x))]

    class FIDInceptionE(tv.InceptionE):
        def __init__(self, in_channels, pool):
            super().__init__(in_channels)
            self._pool = pool

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            return [self.branch1x1(x), b3, d, self.branch_pool(self._pool(x))]

    return tv, FIDInceptionA, FIDInceptionC, FIDInceptionE


class FIDInception(nn.Module):
    """[-1, 1] images (N, C in {1, 3}, H, W) -> pool3 features (N, 2048), float32.

    Inputs are quantized to 8 bits first (the reference statistics come from uint8 images), resized bilinearly
    to 299 x 299 and fed in [-1, 1], as pytorch-fid does with [0, 1] inputs.
    """

    def __init__(self):
        super().__init__()
        tv, A, C, E = _blocks()
        net = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
        net.Mixed_6b, net.Mixed_6c = C(768, channels_7x7=128), C(768, channels_7x7=160)
        net.Mixed_6d, net.Mixed_6e = C(768, channels_7x7=160), C(768, channels_7x7=192)
        net.Mixed_7b, net.Mixed_7c = E(1280, _avg_pool_tf), E(2048, _max_pool)
        self.net = net

    def forward(self, x, logits: bool = False):
        """pool3 features (N, 2048); with logits=True also the 1008-way logits of the graph's softmax layer without
        its bias, (N, 1008), as the original Inception Score code (Salimans et al. 2016) reads them and StyleGAN3's and
        torch-fidelity's metrics follow (`no_output_bias`, `logits_unbiased`)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"FID Inception expects 1 or 3 channels, got shape {tuple(x.shape)}")
        x = (x.float() * 127.5 + 128).clamp(0, 255).floor() / 127.5 - 1    # 8-bit as written to files
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if not logits:
            return features
        return features, features @ self.net.fc.weight.t()


def hub_weights_path():
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)


def find_weights(path=None):
    """The weights file: the given path, else the torch hub cache; a one-line error when missing (no download)."""
    path = path or os.environ.get("CMFAST_INCEPTION_WEIGHTS") or hub_weights_path()
    if not os.path.isfile(path):
        got = "" if path == hub_weights_path() else f" ({path} does not exist)"
        raise FileNotFoundError(f"FID Inception weights not found: put {WEIGHTS_NAME} (pytorch-fid's release "
                                f"'fid_weights') at {hub_weights_path()} or pass its path{got}")
    return path


def load_fid_inception(path=None, device="cpu"):
    """FIDInception with the weights loaded strictly; built on the meta device, so no time goes into a random
    initialization that the weights overwrite."""
    path = find_weights(path)
    with torch.device("meta"):
        net = FIDInception()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.net.load_state_dict(state, strict=True, assign=True)
    except Exception as e:      # not a torch file, a pickle weights_only refuses, other weights: one line
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        why = why if len(why) <= 160 else why[:157] + "..."
        raise ValueError(f"{path}: not the FID Inception weights {WEIGHTS_NAME} ({why})") from None
    return net.eval().to(device)
