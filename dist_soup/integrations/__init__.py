"""Bridges from dist_soup's compressed collectives to other training stacks.

``ddp``: DDP communication hooks (``dist_soup.integrations.ddp.register``) for single-objective
users of ``torch.nn.parallel.DistributedDataParallel``.
"""
