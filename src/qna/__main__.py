from qna.entrypoints.console import main

main()
