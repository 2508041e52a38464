# SPDX-License-Identifier: MIT
"""convert_model on models nobody here wrote (timm, torchvision, random weights): the converted
model computes what the original computes, in float64, in one process: train-mode outputs,
input and parameter gradients under a random upstream gradient, running statistics after the
step, eval outputs; revert_model gives the original classes back. timm's BatchNormAct2d layers
(efficientnet, mobilenetv3, regnet, rexnet, lcnet) become SynchronizedBatchNormAct2d with their
activation fused where the core has it. The 2-process DDP run is in test_distributed.py."""

import copy

import pytest
import torch
from torch import nn

import pysbn
from _support import close, model_zoos

F64 = torch.float64
timm, torchvision = model_zoos()

TIMM = ["efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "rexnet_100", "lcnet_050",
        "resnet18"]
TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf"]


def _timm(name):
    return timm.create_model(name, pretrained=False, num_classes=5, drop_rate=0.0,
                             drop_path_rate=0.0)


def _torchvision(name):
    return getattr(torchvision.models, name)(num_classes=5)


def _randomize_norms(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.8, 1.2, generator=gen)


def _check(model, memory_format=torch.contiguous_format, size=64):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = model.double()
    _randomize_norms(ref, gen)
    conv = pysbn.convert_model(copy.deepcopy(ref))
    n_sync = sum(isinstance(m, pysbn.batchnorm._SynchronizedBatchNorm) for m in conv.modules())
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ref.modules())
    assert n_sync == n_bn, f"converted {n_sync} of {n_bn} batch norms"
    x = torch.randn(4, 3, size, size, dtype=F64, generator=gen).contiguous(
        memory_format=memory_format)
    outs = []
    for m in (conv, ref):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # stochastic depth and dropout draw the same masks
        y = m(xi)
        dy = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
        y.backward(dy)
        outs.append((y, xi.grad))
    close(outs[0][0], outs[1][0], 1e-9, "train output")
    close(outs[0][1], outs[1][1], 1e-9, "input grad")
    grads = dict(conv.named_parameters())
    for name, p in ref.named_parameters():
        close(grads[name].grad, p.grad, 1e-9, f"grad {name}")
    bufs = dict(conv.named_buffers())
    for name, b in ref.named_buffers():
        if b.dtype.is_floating_point:
            close(bufs[name], b, 1e-10, name)
        else:
            assert torch.equal(bufs[name], b), name
    conv.eval()
    ref.eval()
    xe = torch.randn(3, 3, size, size, dtype=F64, generator=gen)
    with torch.no_grad():
        close(conv(xe), ref(xe), 1e-10, "eval output")
    kinds = [type(m) for m in conv.modules()]
    back = pysbn.revert_model(conv)  # replaces the children in place, as convert_model does
    assert [type(m) for m in back.modules()] == [type(m) for m in ref.modules()]
    return kinds


@pytest.mark.parametrize("name", TIMM)
def test_timm_model(name):
    kinds = _check(_timm(name))
    if name != "resnet18":
        assert pysbn.SynchronizedBatchNormAct2d in kinds


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_model(name):
    _check(_torchvision(name))


def test_timm_model_channels_last():
    _check(_timm("mobilenetv3_small_100"), memory_format=torch.channels_last)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "hard_swish",
                                 "tanh"])
def test_batchnorm_act_layer_matches_timm(act):
    """SynchronizedBatchNormAct2d(act_layer=name) against timm's BatchNormAct2d with the same
    activation: outputs, gradients, state dict keys (tanh: not fused, applied after)."""
    from timm.layers import BatchNormAct2d

    gen = torch.Generator().manual_seed(3)
    ref = BatchNormAct2d(6, act_layer=act, dtype=F64)
    sync = pysbn.SynchronizedBatchNormAct2d(6, act_layer=act, dtype=F64)
    _randomize_norms(ref, gen)
    assert list(sync.state_dict()) == list(ref.state_dict())
    sync.load_state_dict(ref.state_dict())
    assert type(sync.act) is type(ref.act)
    x = torch.randn(5, 6, 7, 7, dtype=F64, generator=gen)
    dy = torch.randn(x.shape, dtype=F64, generator=gen)
    for train in (True, False):
        sync.train(train)
        ref.train(train)
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yr = sync(xs), ref(xr)
        ys.backward(dy)
        yr.backward(dy)
        close(ys, yr, 1e-10, f"{act} output (train={train})")
        close(xs.grad, xr.grad, 1e-10, f"{act} input grad (train={train})")
        close(sync.weight.grad, ref.weight.grad, 1e-10, f"{act} weight grad (train={train})")
        close(sync.running_var, ref.running_var, 1e-12, f"{act} running_var")
        sync.zero_grad()
        ref.zero_grad()


def test_patch_sync_batchnorm_with_model_zoos():
    """Under patch_sync_batchnorm(): timm's norm-act factory maps nn.BatchNorm2d (now the
    synchronized class) to SynchronizedBatchNormAct2d (no 'No equivalent norm_act layer'
    error), and a torchvision model built inside gets synchronized layers. (Model code whose
    default argument bound nn.BatchNorm2d at import, like timm's ResNet, keeps torch's class:
    convert_model such models.)"""
    with pysbn.patch_sync_batchnorm():
        layer = timm.layers.get_norm_act_layer(nn.BatchNorm2d, act_layer="silu")(8)
        model = torchvision.models.resnet18(num_classes=3)
    assert type(layer) is pysbn.SynchronizedBatchNormAct2d and type(layer.act) is nn.SiLU
    assert sum(isinstance(m, pysbn.SynchronizedBatchNorm2d) for m in model.modules()) == 20
    with pytest.raises(AssertionError):  # outside the block, timm's map is as it was
        timm.layers.get_norm_act_layer(pysbn.SynchronizedBatchNorm2d)
