"""The jobs behind the command line, one module each: ``run`` (a task sequence), ``fuse``, ``predict``,
``rank`` (source selection) and ``interop`` (AdapterHub / PEFT import and export). What ``run`` and
``fuse`` share (the claimed output folder, the loaded backbone, seeded initial states) is in ``job``."""
