"""Parameter-efficient fine-tuning of a frozen base: LoRA (`lora.py`) and SpIEL sparse fine-tuning with
drop-and-grow (`spiel.py`), each an adapter of the fine-tuning method (`trainer.py`, in moejax/methods.py's
table), and `moejax merge` (`merge.py`)."""
