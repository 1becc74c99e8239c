from qna.entrypoints.cli import main

main()
