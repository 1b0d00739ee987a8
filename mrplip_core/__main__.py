from mrplip_core.cli import main

if __name__ == "__main__":  # python -m mrplip_core (and torchrun -m mrplip_core); importing it runs nothing
    raise SystemExit(main())
