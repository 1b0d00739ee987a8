if __name__ == "__main__":  # python -m mrplip_core (and torchrun -m mrplip_core); importing it runs nothing
    from mrplip_core.lifetime import die_with_launcher

    die_with_launcher()  # under torchrun: before anything heavy loads (see mrplip_core.lifetime)

    from mrplip_core.cli import main

    raise SystemExit(main())
