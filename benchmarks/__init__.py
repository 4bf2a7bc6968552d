"""gatedrnn's benchmarks: `python -m benchmarks` times gatedrnn against torch.nn side by side."""
