"""The torchvision CPU shim: timm imports, and the registered nms matches a brute-force NMS."""
import subprocess
import sys

import pytest
import torch

from dist_fair.compat.torchvision_cpu import nms_reference


def _brute_force_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep = []
    for i in order:
        ok = True
        for j in keep:
            xx1, yy1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            xx2, yy2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0.0, xx2 - xx1) * max(0.0, yy2 - yy1)
            area = lambda b: max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])  # noqa: E731
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_reference_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(40, 4, generator=g)
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.rand(40, generator=g)
    got = nms_reference(boxes, scores, 0.4).tolist()
    assert got == _brute_force_nms(boxes.tolist(), scores.tolist(), 0.4)


def test_timm_imports_and_nms_op_registered_in_fresh_process():
    code = (
        "from dist_fair.compat.torchvision_cpu import import_timm\n"
        "timm = import_timm()\n"
        "import torch\n"
        "m = timm.create_model('resnet18', pretrained=False, num_classes=0)\n"
        "assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 512)\n"
        "b = torch.tensor([[0., 0., 1., 1.], [0., 0., 1., 1.01], [2., 2., 3., 3.]])\n"
        "s = torch.tensor([0.9, 0.8, 0.7])\n"
        "print(torch.ops.torchvision.nms(b, s, 0.5).tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0, 2]"
