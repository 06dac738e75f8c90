"""Bridges from dist_soup's compressed collectives to other training stacks.

``ddp``: DDP communication hooks (``dist_soup.integrations.ddp.register``) for single-objective
users of ``torch.nn.parallel.DistributedDataParallel``.

``deepspeed``: ``dist_soup.integrations.deepspeed.initialize`` in place of ``deepspeed.initialize``
(ZeRO stage 0): the compressed exchange and the soup step inside DeepSpeed's engine;
``deepspeed_train`` runs ``dist-soup train --deepspeed DS_JSON`` through it.
"""
