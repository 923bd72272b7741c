"""Run: python benchmarks/cpu_attention_path.py [BATCH]. MAE-Tiny pre-training step on the CPU: timm's fused SDPA everywhere vs explicit softmax(q k^T s) v in the
encoder blocks (50 tokens: our former CPU path). Alternating A/B rounds; median ms per step."""
import json, statistics, sys, time
import torch, timm, mae_lite  # noqa
torch.manual_seed(0)
batch = int(sys.argv[1]) if len(sys.argv) > 1 else 32
model = timm.create_model("mae_vit_tiny_patch16", norm_pix_loss=True)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(batch, 3, 224, 224)
def step():
    t = time.perf_counter(); loss = model(x, 0.75)[0]; loss.backward(); opt.step(); opt.zero_grad(); return time.perf_counter() - t
times = {"fused": [], "explicit_encoder": []}
for r in range(6):
    for mode in times:
        for b in model.blocks:
            b.attn.fused_attn = mode == "fused"
        step()  # warm-up per switch
        times[mode].append(step())
res = {k: round(statistics.median(v) * 1000, 1) for k, v in times.items()}
res["batch"] = batch; res["threads"] = torch.get_num_threads()
print(json.dumps(res))
