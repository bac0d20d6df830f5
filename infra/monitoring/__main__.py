from infra.monitoring import main

main()
