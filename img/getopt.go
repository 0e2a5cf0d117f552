package img

import "strings"

// A small getopt_long, as qemu-img parses its command lines: short
// options may be grouped ("-qp") and take their argument attached or as
// the next word ("-fraw", "-f raw"); long options take "--name=value" or
// "--name value"; options and operands may be mixed (GNU permutation);
// "--" ends the options.

type optSpec struct {
	short string   // "f:O:q": a letter, ':' after it when it takes an argument
	long  []string // "output=": '=' at the end when it takes an argument
}

type opt struct {
	name string // the letter or the long name
	arg  string
}

// getopt returns the options in order and the operands. On error it has
// already printed qemu-img's message and returns ok=false.
func (t *Tool) getopt(args []string, spec optSpec) (opts []opt, operands []string, ok bool) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			operands = append(operands, args[i+1:]...)
			return opts, operands, true
		case strings.HasPrefix(a, "--"):
			name, val, hasVal := strings.Cut(a[2:], "=")
			name2 := ""
			known, takesArg := false, false
			matches := 0
			for _, l := range spec.long {
				ln := strings.TrimSuffix(l, "=")
				if ln == name {
					known, takesArg, matches, name2 = true, strings.HasSuffix(l, "="), 1, ""
					break
				}
				if strings.HasPrefix(ln, name) && name != "" {
					// getopt_long takes a unique abbreviation.
					matches++
					known, takesArg = true, strings.HasSuffix(l, "=")
					name2 = ln
				}
			}
			if matches > 1 {
				known = false
			} else if matches == 1 && name2 != "" {
				name = name2
			}
			if !known {
				t.usageErr("unrecognized option '%s'", a)
				return nil, nil, false
			}
			if takesArg && !hasVal {
				if i+1 >= len(args) {
					t.usageErr("missing argument for option '--%s'", name)
					return nil, nil, false
				}
				i++
				val = args[i]
			} else if !takesArg && hasVal {
				t.usageErr("unrecognized option '%s'", a)
				return nil, nil, false
			}
			opts = append(opts, opt{name, val})
		case strings.HasPrefix(a, "-") && a != "-":
			for j := 1; j < len(a); j++ {
				c := a[j]
				k := strings.IndexByte(spec.short, c)
				if k < 0 || c == ':' {
					t.usageErr("unrecognized option '%s'", a)
					return nil, nil, false
				}
				if k+1 < len(spec.short) && spec.short[k+1] == ':' {
					val := a[j+1:]
					if val == "" {
						if i+1 >= len(args) {
							t.usageErr("missing argument for option '-%c'", c)
							return nil, nil, false
						}
						i++
						val = args[i]
					}
					opts = append(opts, opt{string(c), val})
					break
				}
				opts = append(opts, opt{string(c), ""})
			}
		default:
			operands = append(operands, a)
		}
	}
	return opts, operands, true
}
