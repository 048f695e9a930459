import torch

from ee_diffusion.metrics import count_flops


def test_count_flops_counts_products_and_the_cpus_attention_as_its_two_products():
    linear = torch.nn.Linear(8, 4)
    with count_flops() as counted:
        linear(torch.randn(3, 8))
    assert counted.total == 2 * 3 * 8 * 4
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8)
    with count_flops() as fused:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with count_flops() as spelled_out:
        (q @ k.transpose(-1, -2)).softmax(-1) @ v
    assert fused.total == spelled_out.total == 2 * (2 * 2 * 4 * 16 * 12 * 8)
