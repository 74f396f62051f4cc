"""Writes tests/data/dinov2-tiny: a random 2-block transformers DINOv2 (the Phikon-v2 layout) and its
class-token output on a seeded input, so bd's key mapping is checked against transformers itself.

Run (transformers 4.57.6 installed): python tests/data/dinov2-tiny/make_fixture.py tests/data/dinov2-tiny
"""
import sys
import numpy as np, torch, transformers
from transformers import Dinov2Config, Dinov2Model
out = sys.argv[1]
torch.manual_seed(0)
cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, patch_size=16,
                   image_size=64, layerscale_value=0.5, layer_norm_eps=1e-6, qkv_bias=True)
model = Dinov2Model(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():  # non-trivial values everywhere (biases, norms, scales)
        p.add_(0.05 * torch.randn_like(p))
x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
x32 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
with torch.no_grad():
    cls = model(pixel_values=x).last_hidden_state[:, 0]
    cls32 = model(pixel_values=x32).last_hidden_state[:, 0]  # position embedding interpolated 4x4 -> 2x2
model.save_pretrained(out, safe_serialization=True)
np.savez(f"{out}/expected.npz", x=x.numpy(), cls=cls.numpy(), x32=x32.numpy(), cls32=cls32.numpy())
print(transformers.__version__, sorted(model.state_dict())[:8], cls.shape)
