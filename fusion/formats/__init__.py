"""Other tools' file formats: AdapterHub ``adapters`` folders (read and write) and HF PEFT LoRA."""
