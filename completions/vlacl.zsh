
#compdef vlacl

_vlacl_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _VLACL_COMPLETE=complete_zsh vlacl)
}

compdef _vlacl_completion vlacl

