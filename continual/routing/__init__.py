"""Task identification when the task is not given (class-incremental): the streaming-LDA router, the
trained router, and the class-incremental evaluation that uses them."""
