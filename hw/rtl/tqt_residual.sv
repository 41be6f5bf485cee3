// The residual add (docs/integer_only.md, "The residual add"): both operands aligned exactly on the
// finer grid g, summed, rounded once onto the LayerNorm input site:
//   sum = (x << x_shift) + (a << a_shift),   r = clip(shift_round(sum, shift, R)).
// Combinational; the shifts are ports (a per-channel accumulator grid gives one per column).
module tqt_residual #(
    parameter int X_W = 16,
    parameter int A_W = 32,
    parameter int SUM_W = 40,  // the exact sum's proven width (signed)
    parameter int OUT_W = 16,
    parameter int ROUNDING = 2,
    parameter int SHIFT_W = 8
) (
    input  logic signed [X_W-1:0]     x,
    input  logic signed [A_W-1:0]     a,
    input  logic [SHIFT_W-1:0]        x_shift,  // left
    input  logic [SHIFT_W-1:0]        a_shift,  // left
    input  logic signed [SHIFT_W-1:0] shift,    // right
    output logic signed [OUT_W-1:0]   out
);
  logic signed [SUM_W-1:0] x_wide, a_wide, sum;
  assign x_wide = x;  // sign-extended
  assign a_wide = a;
  assign sum = (x_wide <<< x_shift) + (a_wide <<< a_shift);
  tqt_shift_round #(.IN_W(SUM_W), .OUT_W(OUT_W), .OUT_SIGNED(1), .ROUNDING(ROUNDING), .SHIFT_W(SHIFT_W))
      round_sum (.q(sum), .shift(shift), .out(out));
endmodule
