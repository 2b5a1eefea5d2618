from hookvene.cli import main

main()
