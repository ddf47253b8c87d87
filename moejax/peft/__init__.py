"""Parameter-efficient fine-tuning of a frozen base: LoRA (`lora.py`) and SpIEL sparse fine-tuning with
drop-and-grow (`spiel.py`), the trainer's hooks (`trainer.py`) and `moejax merge` (`merge.py`)."""
