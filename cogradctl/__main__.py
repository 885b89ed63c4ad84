from cogradctl.cli import main

main()
