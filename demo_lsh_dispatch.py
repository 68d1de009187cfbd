"""Stock vs LSH dispatch on a small GPT-MoE. Launch: torchrun --nproc_per_node 2 demo_lsh_dispatch.py"""

from megatron_lsh.training.dispatch_demo import main

if __name__ == "__main__":
    main()
