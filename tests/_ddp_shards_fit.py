"""Two CPU ranks (DDP, gloo) fit a tiny classifier from ShardDataModule, run as a real script:

    python tests/_ddp_shards_fit.py DATA_KWARGS_JSON OUT_DIR [TRAINER_KWARGS_JSON]

2 epochs of batch 8 at 16²; each rank writes OUT_DIR/rank<r>.json: its training steps, the global step,
the labels of the validation samples it saw (`val`) and the process group's backend.
"""

import json
import sys

import lightning as L
import torch

from deepres.data.shards import ShardDataModule

torch.set_num_threads(1)


class Tiny(L.LightningModule):
    def __init__(self, num_classes):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, num_classes))
        self.steps, self.val_labels = 0, []

    def training_step(self, batch, _):
        x, y = batch
        self.steps += 1
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, _):
        self.val_labels += batch[1].tolist()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


if __name__ == "__main__":  # data-loader workers start from a fork server, which imports this file
    data_kwargs, out = json.loads(sys.argv[1]), sys.argv[2]
    trainer_kwargs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    dm = ShardDataModule(batch_size=8, num_workers=1, image_size=16, eval_resize=16, **data_kwargs)
    model = Tiny(dm.num_classes)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(model, dm)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"steps": model.steps, "global_step": trainer.global_step, "val": model.val_labels,
                   "backend": torch.distributed.get_backend()}, f)
