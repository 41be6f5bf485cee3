// The embedding sum: clip(lookup[id] + positions[i]), both rows read from the export's tables on
// the site's grid already. Combinational.
module tqt_embedding_sum #(
    parameter int W = 16
) (
    input  logic signed [W-1:0] lookup,
    input  logic signed [W-1:0] position,
    output logic signed [W-1:0] out
);
  localparam logic signed [W:0] HI = (1 <<< (W - 1)) - 1;
  localparam logic signed [W:0] LO = -(1 <<< (W - 1));
  logic signed [W:0] lookup_wide, position_wide, sum;
  assign lookup_wide = lookup;  // sign-extended
  assign position_wide = position;
  assign sum = lookup_wide + position_wide;
  assign out = sum > HI ? HI[W-1:0] : sum < LO ? LO[W-1:0] : sum[W-1:0];
endmodule
